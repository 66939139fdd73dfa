"""Read a W&B offline run file (``run-<id>.wandb``) back, without a server.

The file is W&B's transaction log: a 7-byte header (``:W&B``, 0xBEE1, version
0) followed by LevelDB-log records in 32 KiB blocks (crc32c-like checksum,
length, type FULL/FIRST/MIDDLE/LAST), each a ``wandb_internal_pb2.Record``.
Used by tests and by offline reports; it depends on W&B's internal protobufs,
so ``pyproject.toml`` pins the wandb minor version.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["find_run_files", "iter_records", "read_run"]

_HEADER = struct.Struct("<IHB")
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_records(path: str | Path, *, verify_crc: bool = True) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack_from("<4sHB", data, 0)
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError(f"{path}: not a W&B run file (header {ident!r} {magic:#x} {version})")
    pos, buf = 7, b""
    while pos + _HEADER.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER.size:
            pos += left
            continue
        crc, length, rtype = _HEADER.unpack_from(data, pos)
        if rtype == 0 and length == 0:
            break
        chunk = data[pos + _HEADER.size : pos + _HEADER.size + length]
        if verify_crc and zlib.crc32(chunk, zlib.crc32(bytes([rtype]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: bad record checksum at offset {pos}")
        pos += _HEADER.size + length
        if rtype in (_FIRST, _MIDDLE):
            buf = chunk if rtype == _FIRST else buf + chunk
            continue
        buf = chunk if rtype == _FULL else buf + chunk
        rec = pb.Record()  # type: ignore[attr-defined]  # generated protobuf module
        rec.ParseFromString(buf)
        buf = b""
        yield rec


def _items(items: Any) -> dict[str, Any]:
    return {(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in items}


def read_run(path: str | Path) -> dict[str, Any]:
    """Run metadata, config, history rows, summary and exit code of one offline run."""
    res: dict[str, Any] = {"run": {}, "config": {}, "history": [], "summary": {}, "exit_code": None}
    for rec in iter_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            res["run"] = {
                "run_id": r.run_id,
                "project": r.project,
                "group": r.run_group,
                "name": r.display_name,
                "tags": list(r.tags),
            }
            res["config"].update(_items(r.config.update))
        elif kind == "config":
            res["config"].update(_items(rec.config.update))
        elif kind == "history":
            res["history"].append(_items(rec.history.item))
        elif kind == "summary":
            res["summary"].update(_items(rec.summary.update))
        elif kind == "exit":
            res["exit_code"] = rec.exit.exit_code
    res["config"] = {
        k: v.get("value", v) if isinstance(v, dict) else v for k, v in res["config"].items() if k != "_wandb"
    }
    return res


def find_run_files(run_dir: str | Path) -> list[Path]:
    """All ``run-*.wandb`` files under a lowbit run directory's ``wandb/``."""
    return sorted(Path(run_dir).glob("wandb/*run-*/run-*.wandb"))
