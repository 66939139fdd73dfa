"""BF16 GEMMs in the emulated backend (``recipe.emulated_gemm``): exact operands only, same values.

What must hold: an MX or power-of-two-scaled FP8 operand handed to a BF16 GEMM holds exactly the
values ``quantize_mx`` / ``quantize_fp8_block_*`` return (checked bit for bit, including the
subnormal corner where it must fall back to FP32); the GEMMs really run on BF16 tensors where they
may and on FP32 where they may not (FP8 with FP32 scales, NVFP4); and the outputs differ from the
FP32 path by accumulation order only.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from recipes.fp8 import get_format as get_fp8_format
from recipes.mx import FORMATS, quantize_mx
from recipes.mx.quantize import BF16_MIN_EXP
from recipes.qlinear import LinearQuantizers, quant_linear
from recipes.quantizers import FP8BlockRole, FP8CurrentRole, MXRole, NVFP4Role


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_mx_values_are_exact_in_bf16(fmt):
    x = torch.randn(64, 256, generator=_gen()) * torch.logspace(-20, 20, 256)
    y = quantize_mx(x, fmt, for_gemm=True)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y.float(), quantize_mx(x, fmt))  # the BF16 container changed no value


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_values_below_bf16_subnormals_fall_back_to_fp32(fmt):
    """A block with amax 2^-118 gets the scale 2^-126 (E4M3: emax 8; E5M2: 15, clamped); an element
    2^-135 in it is an element subnormal times that scale: representable in FP32, not in BF16
    (its smallest subnormal is 2^-133). The tensor must stay float32, bit for bit."""
    x = torch.ones(2, 64)
    x[1, 32:] = 0.0
    x[1, 32], x[1, 33] = 2.0**-118 if fmt == "fp8_e4m3" else 2.0**-111, 2.0**-135
    ref = quantize_mx(x, fmt)
    assert ref[1, 33] != 0 and ref[1, 33].bfloat16().float() != ref[1, 33]  # the reason for the check
    y = quantize_mx(x, fmt, for_gemm=True)
    assert y.dtype == torch.float32 and torch.equal(y, ref)


@pytest.mark.parametrize("fmt", ["fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "int8"])
def test_narrow_formats_are_exact_in_bf16_at_every_scale(fmt):
    """Their smallest quantum times E8M0's smallest scale is >= 2^-133: always BF16."""
    f = FORMATS[fmt]
    assert -127 + f.emin - f.mbits >= BF16_MIN_EXP
    x = torch.ones(2, 64)
    x[1, 32:] = torch.linspace(1, 2, 32) * 2.0**-126
    y = quantize_mx(x, fmt, for_gemm=True)
    assert y.dtype == torch.bfloat16 and torch.equal(y.float(), quantize_mx(x, fmt))


def test_all_zero_blocks_do_not_force_fp32():
    x = torch.zeros(4, 64)  # zero blocks get the E8M0 minimum 2^-127 but hold no value
    x[0] = torch.randn(64, generator=_gen())
    assert quantize_mx(x, "fp8_e4m3", for_gemm=True).dtype == torch.bfloat16


class _MMDtypes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            self.seen.append(args[-1].dtype)
        return func(*args, **(kwargs or {}))


def _layer(x_dtype=torch.bfloat16):
    g = _gen(1)
    x = torch.randn(64, 128, generator=g).to(x_dtype).requires_grad_()
    w = (torch.randn(96, 128, generator=g) * 0.1).to(x_dtype).requires_grad_()
    b = torch.randn(96, generator=g).to(x_dtype).requires_grad_()
    gy = torch.randn(64, 96, generator=g).to(x_dtype)
    return x, w, b, gy


def _run(qs, x, w, b, gy):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    with _MMDtypes() as mode:
        y = quant_linear(x, w, b, qs)
        y.backward(gy)
    return (y, x.grad, w.grad, b.grad), mode.seen


def _roles(role, **kw):
    return LinearQuantizers(role, role, role, role, role, **kw)


def test_mx_layer_runs_three_bf16_gemms_and_matches_fp32_up_to_accumulation_order():
    x, w, b, gy = _layer()
    mx = MXRole("fp8_e4m3")
    fast, seen = _run(_roles(mx, gemm="bf16"), x, w, b, gy)
    slow, seen32 = _run(_roles(mx, gemm="fp32"), x, w, b, gy)
    assert seen == [torch.bfloat16] * 3 and seen32 == [torch.float32] * 3
    for f, s in zip(fast, slow):
        assert f.dtype == s.dtype == torch.bfloat16
        # one BF16 rounding of the same FP32-accumulated sum: at most a BF16 ulp apart, and rarely
        torch.testing.assert_close(f.float(), s.float(), rtol=2**-7, atol=1e-6)
        assert (f != s).float().mean() < 0.02


@pytest.mark.parametrize(
    "role", [FP8CurrentRole(get_fp8_format("e4m3")), NVFP4Role()], ids=["fp8_current", "nvfp4"]
)
def test_inexact_roles_keep_fp32_gemms_and_their_bits(role):
    x, w, b, gy = _layer()
    a, seen = _run(_roles(role, gemm="bf16"), x, w, b, gy)
    c, _ = _run(_roles(role, gemm="fp32"), x, w, b, gy)
    assert seen == [torch.float32] * 3
    assert all(torch.equal(p, q) for p, q in zip(a, c))


def test_mixed_high_precision_and_mx_operand_still_bf16():
    """Forward with x in high precision (BF16 engine values, exact) and W in MX: BF16 GEMM."""
    x, w, b, gy = _layer()
    qs = LinearQuantizers(None, MXRole("fp4_e2m1"), None, None, None, gemm="bf16")
    _, seen = _run(qs, x, w, b, gy)
    assert seen[0] == torch.bfloat16


def test_fp32_engine_never_takes_the_bf16_path():
    x, w, b, gy = _layer(torch.float32)
    _, seen = _run(_roles(MXRole("fp8_e4m3"), gemm="bf16"), x, w, b, gy)
    assert seen == [torch.float32] * 3


# ---------------------------------------------------------------- FP8 with power-of-two scales


def test_fp8_block_and_rowwise_power_of_two_values_are_exact_in_bf16():
    from recipes.fp8 import quantize_fp8_block_1d, quantize_fp8_block_2d, quantize_fp8_rowwise

    x = torch.randn(256, 256, generator=_gen(2)) * torch.logspace(-20, 20, 256)
    for fn, kw in ((quantize_fp8_block_1d, {}), (quantize_fp8_block_2d, {}), (quantize_fp8_rowwise, {})):
        y = fn(x, "e4m3", for_gemm=True, **kw)
        assert y.dtype == torch.bfloat16 and torch.equal(y.float(), fn(x, "e4m3", **kw)), fn.__name__
        # FP32 scales (power_2_scales=False) are not exact in BF16: float32, the same values
        y32 = fn(x, "e4m3", for_gemm=True, power_2_scales=False, **kw)
        assert y32.dtype == torch.float32 and torch.equal(y32, fn(x, "e4m3", power_2_scales=False, **kw))


def test_fp8_block_below_bf16_subnormals_falls_back_to_fp32():
    """A 1x128 block with amax ~2^-120 gets the scale 2^127 (448/amax overflows FP32: the dtype
    max, rounded down); its codes' quantum 2^-9 / 2^127 = 2^-136 is below BF16's subnormals:
    float32, bit for bit."""
    from recipes.fp8 import quantize_fp8_block_1d

    x = torch.ones(2, 256)
    x[1, 128:] = torch.linspace(-1, 1, 128) * 2.0**-120
    y = quantize_fp8_block_1d(x, "e4m3", for_gemm=True)
    assert y.dtype == torch.float32 and torch.equal(y, quantize_fp8_block_1d(x, "e4m3"))


def test_fp8_block_layer_runs_bf16_gemms():
    x, w, b, gy = _layer()
    role = FP8BlockRole(get_fp8_format("e4m3"), block_size=32)
    fast, seen = _run(_roles(role, gemm="bf16"), x, w, b, gy)
    slow, _ = _run(_roles(role, gemm="fp32"), x, w, b, gy)
    assert seen == [torch.bfloat16] * 3
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f.float(), s.float(), rtol=2**-7, atol=1e-6)
