"""The scaled matmul kernels themselves: per-tensor against rowwise scales, and FP32 / BF16 GEMMs.

Why ``recipes.fp8.gemm`` passes per-tensor scales as rows on the CPU: torch's CPU kernel for
tensorwise scales is a reference loop, its rowwise path is a oneDNN GEMM. This prints, for each
shape, the median time of each variant over ``--reps`` interleaved rounds and its ratio to the
rowwise call taken in the same round (median and interquartile range).

    python -m bench.scaled_mm
    python -m bench.scaled_mm --shapes 2048x128x384 4096x512x512 --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["2048x128x384", "2048x512x128"], help="MxKxN")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    dev = torch.device(args.device)
    print(f"device={dev} torch={torch.__version__} reps={args.reps} (interleaved)")
    print("| shape MxKxN | variant | median ms | x rowwise (median) | IQR |\n|---|---|---|---|---|")
    for shape in args.shapes:
        M, K, N = (int(v) for v in shape.split("x"))
        for k, ts, ratios in bench_shape(M, K, N, dev, args.reps):
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
            print(
                f"| {shape} | {k} | {statistics.median(ts) * 1e3:.2f} | {statistics.median(ratios):.2f} | {q[2] - q[0]:.2f} |"
            )


def bench_shape(
    M: int, K: int, N: int, dev: torch.device, reps: int
) -> list[tuple[str, list[float], list[float]]]:
    """(variant, seconds per round, ratio to the rowwise call of the same round) for one shape."""
    a = torch.randn(M, K, device=dev).to(torch.float8_e4m3fn)
    b = torch.randn(N, K, device=dev).to(torch.float8_e4m3fn).t()
    one = torch.tensor(0.5, device=dev)
    ra, rb = one.expand(M, 1).contiguous(), one.expand(1, N).contiguous()
    a32, b32, a16, b16 = a.float(), b.float(), a.bfloat16(), b.bfloat16()
    variants = {
        "rowwise": lambda: torch._scaled_mm(a, b, ra, rb, out_dtype=torch.float32),
        "tensorwise": lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.float32),
        "fp32 mm": lambda: a32 @ b32,
        "bf16 mm": lambda: a16 @ b16,
    }
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(reps):
        for k, fn in variants.items():
            times[k].append(_time(fn))
    return [(k, ts, [t / r for t, r in zip(ts, times["rowwise"])]) for k, ts in times.items()]


if __name__ == "__main__":
    main()
