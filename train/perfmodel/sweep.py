"""``python -m train.perfmodel -m OVERRIDES``: one prediction per point of a sweep, as a table
(CSV, Markdown, JSON) and plots.

    python -m train.perfmodel -m --out outputs/perfmodel/s1 model=tiny,125m,1.3b,13b \\
        +recipe=bf16,fp8_delayed,mxfp8,nvfp4 hardware=h100,b200

The override syntax is Hydra's multirun syntax (``KEY=a,b,c``, ``KEY=range(1,4)``), parsed by
Hydra's own override parser; the points are the cartesian product of the swept lists, in the
order the overrides are given (the first one outermost), and every other override applies to
every point. The tool expands the product itself instead of going through Hydra's launcher:
one process, no per-point job directory. Each point is exactly the single prediction
(``python -m train.perfmodel`` with that point's overrides), its speedup over ``bf16`` on the
same config included. Every point is composed before any is predicted, and every point is
predicted before anything is written, so a bad value is one ``lowbit: config error:`` line
(exit 2) and leaves no partial table.

Files in ``--out DIR``: ``perfmodel_sweep.csv`` and ``perfmodel_sweep.md`` (a row per point),
``perfmodel_sweep.json`` (the rows, the swept keys, the overrides and each point's summary),
``step_breakdown.png`` and ``speedup_vs_model_size.png`` (``train.perfmodel.sweep_plots``).
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipes.errors import ConfigError
from train.perfmodel.sweep_plots import KIND_ORDER, breakdown_figure, kind_column, speedup_figure

TABLE, MARKDOWN, JSON_FILE = "perfmodel_sweep.csv", "perfmodel_sweep.md", "perfmodel_sweep.json"


@dataclass
class Point:
    """One point of the sweep: its swept values (key without ``+``/``~`` -> value), the full
    override list, and after ``run_sweep`` its table row and prediction summary."""

    values: dict[str, str]
    overrides: list[str]
    row: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def _parse(arg: str) -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_override(arg)
    except HydraException as e:
        key, _, value = arg.partition("=")
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            key.lstrip("+~") or arg, value, f"not a sweep override ({msg}); write KEY=a,b,c"
        ) from None


def expand(overrides: list[str]) -> tuple[list[str], list[Point]]:
    """(the swept keys, the points of the cartesian product); ConfigError on a malformed or
    repeated key or a repeated value."""
    axes: list[list[tuple[str, str | None]]] = []
    swept: list[str] = []
    seen: set[str] = set()
    for arg in overrides:
        if "=" not in arg:
            raise ConfigError(
                arg, "", "a sweep takes KEY=VALUE overrides (KEY=a,b,c to sweep); flags go first"
            )
        o = _parse(arg)
        key = o.get_key_element()
        name = key.lstrip("+~")
        if name in seen:
            raise ConfigError(
                name, arg.partition("=")[2], "given twice; put all its values in one comma list"
            )
        seen.add(name)
        if not o.is_sweep_override():
            axes.append([(arg, None)])
            continue
        try:
            values = [str(v) for v in o.sweep_string_iterator()]
        except Exception as e:  # glob() needs the group's options, which the parser does not know
            raise ConfigError(
                name, arg.partition("=")[2], f"only comma lists and range() sweep here ({e})"
            ) from None
        dup = sorted({v for v in values if values.count(v) > 1})
        if dup or not values:
            raise ConfigError(
                name, arg.partition("=")[2], f"each value once (repeated: {', '.join(dup) or 'none given'})"
            )
        swept.append(name)
        axes.append([(f"{key}={v}", v) for v in values])
    points = []
    for combo in itertools.product(*axes):
        at = {n: v for n, (_, v) in zip(_names(overrides), combo) if v is not None}
        points.append(Point(at, [o for o, _ in combo]))
    return swept, points


def _names(overrides: list[str]) -> list[str]:
    return [o.partition("=")[0].lstrip("+~") for o in overrides]


#: compose one point (its overrides) into something ``predict`` takes; ConfigError on a mistake
Compose = Callable[[list[str]], Any]
#: (the composed point) -> (its prediction, bf16's on the same config), as ``predict_step`` gives
Predict = Callable[[Any], tuple[dict[str, Any], dict[str, Any]]]


def run_sweep(points: list[Point], *, compose: Compose, predict: Predict) -> list[Point]:
    """Compose every point, then predict every point (module docstring: no partial output)."""
    composed = []
    for p in points:
        composed.append(_at(p, compose, p.overrides))
    for p, c in zip(points, composed):
        pred, base = _at(p, predict, c)
        p.summary = {
            **pred["summary"],
            "speedup_over_bf16": base["summary"]["step_time_s"] / pred["summary"]["step_time_s"],
        }
        p.row = table_row(p, pred, base)
    return points


def _at(p: Point, fn: Callable[[Any], Any], arg: Any) -> Any:
    """``fn(arg)``; a ConfigError names the sweep point it came from."""
    try:
        return fn(arg)
    except ConfigError as e:
        where = ", ".join(f"{k}={v}" for k, v in p.values.items())
        raise ConfigError(e.key, e.value, f"{e.fix} (sweep point {where})" if where else e.fix) from None


def table_row(p: Point, pred: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """One point as a flat row: what it is, the summary, and the step time by component kind."""
    s, b = pred["summary"], base["summary"]
    row: dict[str, Any] = {
        "model": s["model"], "params": s["num_params"], "recipe": s["recipe"], "hardware": s["hardware"],
    }  # fmt: skip
    row |= {k: v for k, v in p.values.items() if k not in row}
    row |= {
        "gpus": s["gpus"], "zero_stage": s["zero_stage"], "tokens_per_step": s["tokens_per_step"],
        "step_ms": 1e3 * s["step_time_s"], "bf16_step_ms": 1e3 * b["step_time_s"],
        "speedup_over_bf16": b["step_time_s"] / s["step_time_s"], "tokens_per_s_per_gpu": s["tokens_per_s_per_gpu"],
        "mfu_bf16_peak_pct": 100 * s["mfu_bf16_peak"], "mfu_format_peak_pct": 100 * s["mfu_format_peak"],
        "format_family": s["format_family"], "emulated_as": s["format_emulated_as"] or "",
        "memory_per_gpu_gb": s["memory_per_gpu_gb"], "fits_in_hbm": s["fits_in_hbm"],
        "top_bottleneck": s["top_bottleneck"],
    }  # fmt: skip
    by_kind = s["time_by_kind_s"]
    row |= {kind_column(k): 1e3 * by_kind.get(k, 0.0) for k in KIND_ORDER}
    row |= {kind_column(k): 1e3 * t for k, t in by_kind.items() if k not in KIND_ORDER}
    return row


def _cell(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, float):
        return str(v)
    return f"{v:.4g}"


def markdown(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0]) if rows else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write(
    points: list[Point], swept: list[str], out: Path, *, overrides: list[str], title: str
) -> list[Path]:
    """The table (CSV, Markdown, JSON) and the plots into ``out``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [p.row for p in points]
    cols = list(dict.fromkeys(c for r in rows for c in r))
    with (out / TABLE).open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    (out / MARKDOWN).write_text(
        f"# {title}\n\n    python -m train.perfmodel -m {' '.join(overrides)}\n\n" + markdown(rows)
    )
    doc = {"swept": swept, "overrides": overrides, "rows": rows,
           "points": [{"values": p.values, "overrides": p.overrides, "summary": p.summary} for p in points]}  # fmt: skip
    (out / JSON_FILE).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    paths = [out / TABLE, out / MARKDOWN, out / JSON_FILE]
    for name, fig in (("step_breakdown", breakdown_figure(points, title=title)),
                      ("speedup_vs_model_size", speedup_figure(points, title=title))):  # fmt: skip
        fig.savefig(out / f"{name}.png", dpi=100)
        paths.append(out / f"{name}.png")
    return paths
