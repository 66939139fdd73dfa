"""Code GEMMs in the emulated backend (``recipe.emulated_gemm=codes``, the default).

What must hold: per-tensor FP8 and NVFP4 operands enter the GEMM as BF16 codes that are exact
(the BF16 container changes no value) and whose product with the per-tensor scale is the value
``__call__`` quantizes to (up to the one FP32 rounding of the dequantization); the same amaxes are
recorded (delayed scaling) and the same random numbers drawn (stochastic rounding); the three GEMMs
really run on BF16 tensors; and a code GEMM is within one BF16 ulp of the exactly rounded scaled
product, which is the one place it may differ from the FP32 path beyond accumulation order.
"""

from __future__ import annotations

import pytest
import torch

from recipes.fp8 import DelayedScaling, DelayedScalingState
from recipes.fp8 import get_format as get_fp8_format
from recipes.mx.nvfp4 import nvfp4_codes, nvfp4_codes_2d, quantize_nvfp4, quantize_nvfp4_2d
from recipes.qlinear import _mm, fp32_output_mm
from recipes.quantizers import (
    Codes,
    FP8CurrentRole,
    FP8DelayedRole,
    FP8RowwiseRole,
    MXRole,
    NVFP4Role,
    SRGenerator,
)

from .test_bf16_gemm import _layer, _roles, _run

E4M3 = get_fp8_format("e4m3")


def _within_a_bf16_ulp(f: torch.Tensor, s: torch.Tensor) -> None:
    """|f - s| <= 1 BF16 ulp of the larger output, plus accumulation-order noise of outputs near
    zero (an FP32 sum's absolute error scales with the terms, not with the sum)."""
    f, s = f.float(), s.float()
    tol = torch.maximum(f.abs(), s.abs()) * 2.0**-7 + 1e-5 * s.abs().max()
    assert ((f - s).abs() <= tol).all(), ((f - s).abs() - tol).max()


def _x(seed: int = 0, shape=(64, 256)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.logspace(-3, 3, shape[-1])


def _bf16_exact(c: Codes) -> None:
    assert c.values.dtype == torch.bfloat16 and c.scale.dtype == torch.float32 and c.scale.dim() == 0


@pytest.mark.parametrize("two_d", [False, True])
def test_nvfp4_codes_are_exact_in_bf16_and_dequantize_to_the_quantized_values(two_d):
    x = _x(1)
    c, s_t = nvfp4_codes_2d(x) if two_d else nvfp4_codes(x, axis=-1)
    assert torch.equal(c.bfloat16().float(), c)  # E2M1 x E4M3: <= 6 significant bits
    ref = quantize_nvfp4_2d(x) if two_d else quantize_nvfp4(x, axis=-1)
    # quantize_nvfp4 rounds s_t * s_b first, then the element product: one FP32 rounding apart
    torch.testing.assert_close(c * s_t, ref, rtol=2**-23, atol=0)
    assert ((c * s_t) == ref).float().mean() > 0.9
    role = NVFP4Role(two_d=two_d)
    codes = role.gemm_codes(x, axis=-1)
    _bf16_exact(codes)
    assert torch.equal(codes.values.float(), c) and torch.equal(codes.scale, s_t)


def test_nvfp4_stochastic_codes_draw_the_same_noise_as_the_quantizer():
    x = _x(2)
    a, b = SRGenerator(seed=7), SRGenerator(seed=7)
    ref = NVFP4Role(rounding="stochastic", sr=a)(x, axis=-1)
    codes = NVFP4Role(rounding="stochastic", sr=b).gemm_codes(x, axis=-1)
    torch.testing.assert_close(codes.values.float() * codes.scale, ref, rtol=2**-23, atol=0)
    assert torch.equal(a.get(x.device).get_state(), b.get(x.device).get_state())


def test_nvfp4_nan_block_stays_nan_in_codes():
    x = _x(3)
    x[0, 5] = float("nan")
    c = NVFP4Role().gemm_codes(x, axis=-1).values
    assert c[0, :16].isnan().all() and not c[0, 16:].isnan().any() and not c[1:].isnan().any()


def test_fp8_current_codes_are_the_cast_codes():
    x = _x(4)
    role = FP8CurrentRole(E4M3)
    codes, op = role.gemm_codes(x, axis=-1), role.cast(x, axis=-1)
    _bf16_exact(codes)
    assert torch.equal(codes.values.float(), op.q.float()) and torch.equal(codes.scale, op.scale_inv)
    # quantize_fp8 divides by the scale, the GEMM multiplies by 1/scale: one FP32 rounding apart
    torch.testing.assert_close(codes.values.float() * codes.scale, role(x, axis=-1), rtol=2**-23, atol=0)


def test_fp8_delayed_codes_record_the_same_amax_as_the_quantizer():
    recipe = DelayedScaling(amax_history_len=4)
    states = [DelayedScalingState(recipe), DelayedScalingState(recipe)]
    for st in states:
        st.register("l/input")
    x = _x(5)
    ref = FP8DelayedRole(states[0], "l/input")(x, axis=-1)
    codes = FP8DelayedRole(states[1], "l/input").gemm_codes(x, axis=-1)
    _bf16_exact(codes)
    torch.testing.assert_close(codes.values.float() * codes.scale, ref, rtol=2**-23, atol=0)
    for st in states:
        st.step()
    assert torch.equal(states[0].amax_history, states[1].amax_history)
    assert torch.equal(states[0].scales, states[1].scales) and states[0].amax_history.max() > 0


def test_roles_without_per_tensor_codes_answer_none():
    x = _x(6)
    for role in (MXRole("fp8_e4m3"), FP8RowwiseRole(E4M3)):
        assert role.gemm_codes(x, axis=-1) is None


@pytest.mark.parametrize(
    "role",
    [FP8CurrentRole(E4M3), FP8CurrentRole(get_fp8_format("e5m2")), NVFP4Role(), NVFP4Role(two_d=True)],
    ids=["fp8_current_e4m3", "fp8_current_e5m2", "nvfp4", "nvfp4_2d"],
)
def test_layer_runs_three_bf16_code_gemms_within_a_bf16_ulp_of_fp32(role):
    x, w, b, gy = _layer()
    fast, seen = _run(_roles(role, gemm="codes"), x, w, b, gy)
    slow, seen32 = _run(_roles(role, gemm="fp32"), x, w, b, gy)
    # the biased forward runs its codes in FP32 on a device without an FP32-output BF16 GEMM
    fwd = torch.bfloat16 if fp32_output_mm("cpu") else torch.float32
    assert seen == [fwd, torch.bfloat16, torch.bfloat16] and seen32 == [torch.float32] * 3
    for f, s in zip(fast, slow):
        assert f.dtype == s.dtype == torch.bfloat16
        _within_a_bf16_ulp(f, s)  # the CPU's BF16 GEMM rounds, then the scale: one more rounding


def test_fp32_engine_never_takes_the_code_path():
    x, w, b, gy = _layer(torch.float32)
    _, seen = _run(_roles(FP8CurrentRole(E4M3), gemm="codes"), x, w, b, gy)
    assert seen == [torch.float32] * 3


def test_code_gemm_is_within_one_bf16_ulp_of_the_exactly_rounded_product():
    """512x1024x512 E4M3 codes, scales 0.0123 and 0.37: against FP64 ``sa*sb*(A@B)`` rounded once
    to BF16, every output is at most 1 BF16 ulp off; where the device has an FP32-output BF16
    GEMM, none is off by more than accumulation order allows (a few outputs)."""
    g = torch.Generator().manual_seed(8)
    a = torch.randn(512, 1024, generator=g).to(torch.float8_e4m3fn)
    b = torch.randn(1024, 512, generator=g).to(torch.float8_e4m3fn)
    sa, sb = torch.tensor(0.0123), torch.tensor(0.37)
    exact = (a.double() @ b.double() * (sa.double() * sb.double())).bfloat16()
    y = _mm(Codes(a.bfloat16(), sa), Codes(b.bfloat16(), sb)).bfloat16()
    ulp = exact.float().abs() * 2.0**-7
    off = (y.float() - exact.float()).abs()
    assert (off <= ulp * 1.0001).all()
    frac = (y != exact).float().mean().item()
    if fp32_output_mm("cpu"):
        assert frac < 0.01, frac
    else:
        assert 0.1 < frac < 0.5, frac  # measured 0.27 (the double rounding this path documents)


def test_mixed_codes_and_high_precision_operand_and_the_bias_rule():
    """Forward with W as codes and x left in BF16: a BF16 GEMM, W's scale applied; with a bias
    (on a device without an FP32-output BF16 GEMM) an FP32 GEMM on the same codes."""
    from recipes.qlinear import LinearQuantizers, quant_linear

    from .test_bf16_gemm import _MMDtypes

    x, w, b, _ = _layer()
    role = FP8CurrentRole(E4M3)
    qs = LinearQuantizers(None, role, None, None, None, gemm="codes")
    ref = x.float() @ role(w.float(), axis=-1).t()
    with _MMDtypes() as mode:
        y = quant_linear(x, w, None, qs)
        yb = quant_linear(x, w, b, qs)
    assert mode.seen == [torch.bfloat16, torch.bfloat16 if fp32_output_mm("cpu") else torch.float32]
    _within_a_bf16_ulp(y, ref.bfloat16())
    _within_a_bf16_ulp(yb, (ref + b.float()).bfloat16())
