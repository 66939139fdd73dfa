"""Where a run's quantization error sits: which layer, which GEMM, which operand.

``python -m train.review.hotspots RUN_DIR [RUN_DIR ...]`` reads each run's ``gemm/`` and
``scales/`` keys (``train/telemetry``; a run takes them at its stat steps) and prints, as a
Markdown table per run:

* per GEMM (``fwd``, ``dgrad``, ``wgrad``): the output SQNR (dB) averaged over layers, the layer
  where it is lowest, and the operand whose quantization alone costs most there (the lowest
  ``<role>_sqnr_db``);
* the block-scale statistics (``scales/<layer>/<role>/*``, block formats only) at their worst:
  the layer and role with the largest ``zero_block_frac``, ``saturated_frac`` and
  ``rule_sensitive_frac``.

Every value is the mean over the run's stat steps (the statistics of one step are noisy);
``--last`` takes the last stat step instead. Nothing here recomputes a statistic: it only reads.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from train.review.runs import find_run_dirs
from train.review.series import Series, read_series

GEMMS = ("fwd", "dgrad", "wgrad")
_GEMM_KEY = re.compile(r"^gemm/(?P<layer>.+)/(?P<gemm>fwd|dgrad|wgrad)/(?P<what>[a-z_]+)$")
_SCALE_KEY = re.compile(r"^scales/(?P<layer>.+)/(?P<role>[a-z_]+)/(?P<what>[a-z_]+_frac)$")
SCALE_STATS = ("zero_block_frac", "saturated_frac", "rule_sensitive_frac")


def _value(series: Series, key: str, *, last: bool) -> float:
    _, v = series.get(key)
    v = v[np.isfinite(v)]
    if not len(v):
        return float("nan")
    return float(v[-1] if last else v.mean())


def hotspots(series: Series, *, last: bool = False) -> dict:
    """Per GEMM: mean SQNR over layers, the worst layer and its costliest operand; the worst
    block-scale statistics. Pure function of the series (tested on a hand-made one)."""
    sqnr: dict[str, dict[str, float]] = defaultdict(dict)  # gemm -> layer -> sqnr_db
    roles: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)  # (gemm, layer) -> role -> dB
    worst_scale: dict[str, tuple[float, str, str]] = {}
    for key in series.keys():
        if m := _GEMM_KEY.match(key):
            val = _value(series, key, last=last)
            if m["what"] == "sqnr_db":
                sqnr[m["gemm"]][m["layer"]] = val
            elif m["what"].endswith("_sqnr_db"):
                roles[(m["gemm"], m["layer"])][m["what"].removesuffix("_sqnr_db")] = val
        elif (m := _SCALE_KEY.match(key)) and m["what"] in SCALE_STATS:
            val = _value(series, key, last=last)
            if np.isfinite(val) and (m["what"] not in worst_scale or val > worst_scale[m["what"]][0]):
                worst_scale[m["what"]] = (val, m["layer"], m["role"])
    gemms = {}
    for gemm in GEMMS:
        layers = {k: v for k, v in sqnr.get(gemm, {}).items() if np.isfinite(v)}
        if not layers:
            continue
        layer = min(layers, key=layers.__getitem__)
        ops = roles.get((gemm, layer), {})
        op = min(ops, key=ops.__getitem__) if ops else None
        gemms[gemm] = {
            "mean_sqnr_db": float(np.mean(list(layers.values()))),
            "worst_layer": layer,
            "worst_sqnr_db": layers[layer],
            "costliest_operand": op,
            "operand_sqnr_db": ops.get(op, float("nan")) if op else float("nan"),
        }
    scales = {k: {"value": v, "layer": lay, "role": role} for k, (v, lay, role) in worst_scale.items()}
    return {"gemms": gemms, "scales": scales}


def render(name: str, spots: dict) -> str:
    lines = [f"### {name}", "", "| GEMM | mean SQNR dB | worst layer | its SQNR dB | costliest operand there (alone, dB) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for gemm, g in spots["gemms"].items():
        op = f"{g['costliest_operand']} ({g['operand_sqnr_db']:.1f})" if g["costliest_operand"] else "-"
        lines.append(
            f"| {gemm} | {g['mean_sqnr_db']:.1f} | {g['worst_layer']} | {g['worst_sqnr_db']:.1f} | {op} |"
        )
    if not spots["gemms"]:
        lines.append("| (no gemm/ keys: a plain recipe, or stats.families without gemm) | | | | |")
    for stat, s in spots["scales"].items():
        lines.append(f"\nworst `{stat}`: {s['value']:.4f} at {s['layer']} / {s['role']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.review.hotspots", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("runs", nargs="+", type=Path, help="run dirs, or dirs holding them")
    ap.add_argument("--last", action="store_true", help="the last stat step, not the mean over stat steps")
    args = ap.parse_args(argv)
    dirs = find_run_dirs(args.runs)
    if not dirs:
        ap.exit(
            2,
            f"lowbit: config error: runs={' '.join(map(str, args.runs))}: no run dir there (one with run_config.yaml): pass a run or sweep directory\n",
        )
    for d in dirs:
        print(render(d.name, hotspots(read_series(d / "metrics.jsonl"), last=args.last)))


if __name__ == "__main__":
    main()
