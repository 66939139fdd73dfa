"""A run's ``metrics.jsonl`` as columns: one numpy array per key, aligned on the logged steps.

Read with pyarrow's JSON reader (multi-threaded C++, one pass, a column per key), not row by row
in Python: a 10k-step file with ~100 keys per statistics row loads in tens of milliseconds. What it
accepts, because the files it reads come from runs in every state:

* strict-JSON non-finite values (``null`` plus ``<key>/nonfinite`` = ``nan`` | ``inf`` | ``-inf``,
  as ``train.telemetry.loggers.encode_row`` writes them) are restored to the float they stood for;
* older files' bare ``NaN`` / ``Infinity`` / ``-Infinity`` tokens (not JSON: pyarrow refuses them)
  are rewritten to that strict form first, for the lines that hold one;
* a last line cut off mid-write (a run in progress, or killed) is dropped;
* a key absent from a row is *absent* (``present`` is False there), not NaN: a NaN is a value the
  run logged. Non-numeric columns (strings, histograms as lists) are left out.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from train.telemetry.loggers import NONFINITE_SUFFIX, encode_row

_BARE = re.compile(rb"(?<![\"\w])(-?Infinity|NaN)(?![\"\w])")
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


@dataclass
class Series:
    """Columns of one run: ``steps`` (int64, in file order) and, per key, float64 ``values``
    with a ``present`` mask of the same length."""

    steps: np.ndarray
    values: dict[str, np.ndarray] = field(default_factory=dict)
    present: dict[str, np.ndarray] = field(default_factory=dict)

    def __contains__(self, key: str) -> bool:
        return key in self.values and bool(self.present[key].any())

    def keys(self) -> list[str]:
        return [k for k in self.values if self.present[k].any()]

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of the rows that logged ``key`` (empty arrays if none did)."""
        if key not in self.values:
            return np.zeros(0, np.int64), np.zeros(0)
        m = self.present[key]
        return self.steps[m], self.values[key][m]

    def last_step(self) -> int | None:
        return int(self.steps[-1]) if len(self.steps) else None

    @staticmethod
    def empty() -> Series:
        return Series(np.zeros(0, np.int64))


def _strict(line: bytes) -> bytes:
    """One line with bare NaN/Infinity tokens, in the strict form (Python's json reads the tokens)."""
    try:
        row = json.loads(line)
    except ValueError:
        return b""  # not a row at all (a torn write in the middle of a file): left out
    return json.dumps(encode_row(row)).encode()


def _clean(data: bytes) -> bytes:
    end = data.rfind(b"\n")
    data = data[: end + 1] if end >= 0 and not data.endswith(b"\n") else data
    if not data.endswith(b"\n") and data:
        try:
            json.loads(data)
            data += b"\n"
        except ValueError:
            data = b""  # the only line is torn
    if b"NaN" in data or b"Infinity" in data:  # memmem first: the regex is slow on megabytes
        data = b"\n".join(_strict(x) if _BARE.search(x) else x for x in data.split(b"\n"))
    return data


def from_rows(rows: list[dict]) -> Series:
    """Columns from rows already parsed (a W&B history; tests)."""
    data = b"".join(json.dumps(encode_row(r)).encode() + b"\n" for r in rows if "step" in r)
    return _from_bytes(data)


def read_series(path: str | Path) -> Series:
    path = Path(path)
    if not path.exists():
        return Series.empty()
    return _from_bytes(_clean(path.read_bytes()))


def _from_bytes(data: bytes) -> Series:
    import pyarrow as pa
    import pyarrow.json as pj

    if not data.strip():
        return Series.empty()
    try:
        table = pj.read_json(io.BytesIO(data), read_options=pj.ReadOptions(block_size=1 << 22))
    except pa.ArrowInvalid:
        # a column that changed type between rows (a number here, a list there): one slow pass
        rows = [json.loads(x) for x in data.splitlines() if x.strip()]
        table = pa.Table.from_pylist([{k: v for k, v in r.items() if _scalar(v)} for r in rows])
    if "step" not in table.column_names:
        return Series.empty()
    steps_col = table.column("step")
    keep = np.asarray(steps_col.is_valid())
    steps = np.asarray(steps_col.to_numpy(zero_copy_only=False))[keep].astype(np.int64)
    out = Series(steps)
    names = set(table.column_names)
    for name in table.column_names:
        if name == "step" or name.endswith(NONFINITE_SUFFIX):
            continue
        col = table.column(name)
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)
                or pa.types.is_boolean(col.type) or pa.types.is_null(col.type)):  # fmt: skip
            continue
        present = np.asarray(col.is_valid())[keep]
        values = np.asarray(col.cast(pa.float64()).fill_null(math.nan).to_numpy(), dtype=np.float64)[keep]
        tag = name + NONFINITE_SUFFIX
        if tag in names:
            kinds = table.column(tag).to_pylist()
            for i in np.flatnonzero(np.asarray(table.column(tag).is_valid())[keep]):
                values[i] = _NONFINITE.get(kinds[np.flatnonzero(keep)[i]], math.nan)
                present[i] = True
        out.values[name], out.present[name] = values, present
    return out


def _scalar(v: object) -> bool:
    return v is None or isinstance(v, (int, float, bool, str))
