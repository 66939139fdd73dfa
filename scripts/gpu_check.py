"""CUDA vs CPU: lowbit's MX and FP8 quantizers must give the same bits on both devices.

Run by scripts/gpu_check.sh, which puts the checkout on PYTHONPATH (the GPU image has no
editable install); by hand: ``PYTHONPATH=$PWD python scripts/gpu_check.py``.
"""

from __future__ import annotations

import sys

import torch

from recipes.fp8 import E4M3, E5M2, quantize_fp8
from recipes.mx import quantize_mx


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.float().cpu(), b.float().cpu()
    nan = torch.isnan(a) & torch.isnan(b)
    return bool(
        torch.equal(torch.where(nan, 0, a).view(torch.int32), torch.where(nan, 0, b).view(torch.int32))
    )


def main() -> int:
    assert torch.cuda.is_available(), "no CUDA device"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1024, generator=gen) * torch.exp2(
        torch.randint(-20, 20, (256, 1), generator=gen).float()
    )
    failures = 0
    for fmt in ("fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "int8"):
        for rounding in ("nearest_even", "nearest_away"):
            for rule in ("floor", "rceil"):
                cpu = quantize_mx(x, fmt, rounding=rounding, scale_rule=rule)
                gpu = quantize_mx(x.cuda(), fmt, rounding=rounding, scale_rule=rule)
                ok = same_bits(cpu, gpu)
                failures += not ok
                print(f"mx {fmt:9s} {rounding:12s} {rule:5s}: {'ok' if ok else 'MISMATCH'}")
    for fmt in (E4M3, E5M2):
        scale = torch.tensor(3.0)
        ok = same_bits(quantize_fp8(x, fmt, scale), quantize_fp8(x.cuda(), fmt, scale.cuda()))
        failures += not ok
        print(f"fp8 {fmt.name}: {'ok' if ok else 'MISMATCH'}")
    print(f"torch._scaled_mm available: {hasattr(torch, '_scaled_mm')}")
    print(f"{failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
