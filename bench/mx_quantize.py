"""Benchmark MX fake quantization: lowbit eager / compiled vs torchao vs a step-by-step reference.

For a ``--size`` x ``--size`` float32 randn tensor (32-element blocks on the
last axis, scale rule FLOOR), per element format and rounding it times:

* ``eager``: ``recipes.mx.quantize_mx``;
* ``compiled``: the same function under ``torch.compile`` (``--no-compile`` skips);
  compile time is excluded (one warm-up call) and reported separately;
* ``torchao``: ``to_mx(..., FLOOR)`` + ``to_dtype(float32)`` (quantize + dequantize,
  round-to-nearest-even; fp8/fp6/fp4 only, skipped if torchao is missing);
* ``ref``: ``recipes.mx.reference.quantize_mx_reference(microxcaling=True)``,
  microxcaling's algorithm step by step (per-element float32 log2 and pow);
  timed on the first ``--ref-rows`` rows and scaled linearly to the full size.

Implementations run interleaved round-robin, ``--repeats`` times each after a
warm-up, and the table shows medians in ms and ratios measured in this run
(on a shared machine compare ratios, not times). It also checks bit-exactness
(eager == compiled; eager == torchao for nearest_even).

    python -m bench.mx_quantize --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from recipes.mx import FORMATS, quantize_mx
from recipes.mx.reference import quantize_mx_reference


def torchao_qdq() -> Callable[[torch.Tensor, str], torch.Tensor] | None:
    """torchao's to_mx + to_dtype (FLOOR), or None if torchao is unavailable."""
    try:
        from torchao.prototype.mx_formats.config import ScaleCalculationMode
        from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx
    except ImportError as e:
        print(f"torchao not available ({e}); skipping the torchao column")
        return None
    dtypes = {
        "fp8_e4m3": torch.float8_e4m3fn,
        "fp8_e5m2": torch.float8_e5m2,
        "fp6_e3m2": "fp6_e3m2",
        "fp6_e2m3": "fp6_e2m3",
        "fp4_e2m1": torch.float4_e2m1fn_x2,
    }

    def qdq(x: torch.Tensor, fmt: str) -> torch.Tensor:
        scale, data = to_mx(x, dtypes[fmt], 32, ScaleCalculationMode.FLOOR)
        return to_dtype(data, scale, dtypes[fmt], 32, torch.float32)

    qdq.formats = set(dtypes)  # type: ignore[attr-defined]
    return qdq


def time_round_robin(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms per function, calls interleaved so load changes hit all of them alike."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.clone(), b.clone()
    a[a.isnan()] = b[b.isnan()] = float("nan")
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def fmt_ratio(num: float | None, den: float | None) -> str:
    return f"{num / den:.1f}x" if num and den else "-"


def run_case(x: torch.Tensor, fmt: str, rounding: str, args: argparse.Namespace, ao) -> dict:
    """Warm up, check bits, time one (format, rounding) case."""
    row: dict = {"fmt": fmt, "rounding": rounding, "checks": []}
    xr = x[: args.ref_rows]
    fns: dict[str, Callable[[], object]] = {"eager": lambda: quantize_mx(x, fmt, rounding=rounding, seed=0)}
    eager = quantize_mx(x, fmt, rounding=rounding, seed=0)
    if not args.no_compile:
        t0 = time.perf_counter()
        compiled = quantize_mx(x, fmt, rounding=rounding, seed=0, compile=True)
        row["compile_s"] = time.perf_counter() - t0
        row["checks"].append("compiled==eager" if same_bits(compiled, eager) else "COMPILED!=EAGER")
        fns["compiled"] = lambda: quantize_mx(x, fmt, rounding=rounding, seed=0, compile=True)
    if ao is not None and fmt in ao.formats:
        theirs = ao(x, fmt)
        if rounding == "nearest_even":
            row["checks"].append("==torchao" if same_bits(theirs, eager) else "!=TORCHAO")
        fns["torchao"] = lambda: ao(x, fmt)
    if rounding != "stochastic":
        quantize_mx_reference(xr, fmt, rounding=rounding, microxcaling=True)
        fns["ref"] = lambda: quantize_mx_reference(xr, fmt, rounding=rounding, microxcaling=True)
    row.update(time_round_robin(fns, args.repeats))
    if "ref" in row:
        row["ref"] *= x.shape[0] / xr.shape[0]
    return row


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    cols = ["eager", "compiled", "torchao", "ref"]
    print(
        f"\nMX fake quantization of a {args.size}x{args.size} fp32 randn tensor, block 32 on the last axis, "
        f"FLOOR; median of {args.repeats} (ms); torch threads={torch.get_num_threads()}"
    )
    print(f"ref timed on {args.ref_rows} rows and scaled x{args.size / args.ref_rows:g}\n")
    head = f"{'format':9} {'rounding':13}" + "".join(f"{c:>10}" for c in cols)
    head += f"{'ao/eager':>10}{'ao/comp':>9}{'ref/eager':>10}{'compile_s':>10}  checks"
    print(head)
    for r in rows:
        line = f"{r['fmt']:9} {r['rounding']:13}" + "".join(
            f"{r[c]:10.1f}" if c in r else f"{'-':>10}" for c in cols
        )
        line += f"{fmt_ratio(r.get('torchao'), r['eager']):>10}{fmt_ratio(r.get('torchao'), r.get('compiled')):>9}"
        line += f"{fmt_ratio(r.get('ref'), r['eager']):>10}"
        line += f"{r['compile_s']:10.1f}" if "compile_s" in r else f"{'-':>10}"
        print(line + "  " + ",".join(r["checks"]))


def summary(rows: list[dict]) -> str:
    """Goal: eager/compiled >= 3x faster than torchao qdq for fp6/fp4, not slower for fp8."""
    parts, met = [], True
    for group, need in (("fp8", 1.0), ("fp6", 3.0), ("fp4", 3.0)):
        for impl in ("eager", "compiled"):
            ratios = [
                r["torchao"] / r[impl]
                for r in rows
                if r["fmt"].startswith(group) and "torchao" in r and impl in r
            ]
            if ratios:
                met &= min(ratios) >= need
                parts.append(f"{group} {impl} {min(ratios):.1f}-{max(ratios):.1f}x")
    if not parts:
        return "summary: torchao not timed; no goal check"
    return "summary: torchao_qdq/lowbit " + "; ".join(parts) + f" -> goal {'MET' if met else 'NOT MET'}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    p.add_argument("--stochastic", action="store_true", help="also time rounding=stochastic")
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated element formats")
    p.add_argument("--ref-rows", type=int, default=1024, help="rows the slow reference is timed on")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.ref_rows = min(args.ref_rows, args.size)
    x = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0))
    ao = torchao_qdq()
    roundings = ["nearest_even", "nearest_away"] + (["stochastic"] if args.stochastic else [])
    rows = [run_case(x, fmt, rnd, args, ao) for fmt in args.formats.split(",") for rnd in roundings]
    print_table(rows, args)
    print("\n" + summary(rows))


if __name__ == "__main__":
    main()
