"""NVFP4 (FP4 E2M1, 16-element blocks, E4M3 block scales, FP32 tensor scale) on hand-built cases."""

from __future__ import annotations

import pytest
import torch

from recipes.mx import quantize_nvfp4
from recipes.mx.nvfp4 import nvfp4_tensor_scale


def row(*values: float, size: int = 32) -> torch.Tensor:
    x = torch.zeros(1, size)
    x[0, : len(values)] = torch.tensor(values)
    return x


def test_two_level_scales_with_a_power_of_two_tensor_scale():
    """s_t = 2^-8: block 0 amax 6 -> s_b = 1/2^-8 = 256 (exact in E4M3), elements unscaled;
    block 1 amax 0.6 -> 0.1/2^-8 = 25.6 -> E4M3 26 -> step 26/256 = 0.1015625."""
    x = row(6.0, 3.0, 1.2, -0.7, 0.2, *([0.0] * 11), 0.6, 0.3, 0.05, 0.01, -0.2)
    y = quantize_nvfp4(x, per_tensor_scale=2.0**-8)[0].tolist()
    assert y[:5] == [6.0, 3.0, 1.0, -0.5, 0.0]
    step = 26 / 256
    assert y[16:21] == [6 * step, 3 * step, 0.5 * step, 0.0, -2 * step]


def test_default_tensor_scale_is_amax_over_6_times_448():
    x = row(336.0, 100.0, 7.0, *([1.0] * 13), 2.0)  # amax 336 -> s_t = 336 / 2688 = 1/8 exactly
    ts = nvfp4_tensor_scale(torch.tensor(336.0))
    assert ts.dec.item() == 0.125 and ts.enc.item() == 8.0
    y = quantize_nvfp4(x)[0]
    # block 0: s_b = (336/6)/(1/8) = 448, step 56: 336 -> 6, 100 -> 1.79 -> 2, 7 -> 0.125 -> 0
    assert y[:3].tolist() == [336.0, 112.0, 0.0]
    # block 1: amax 2 -> (2/6)*8 = 2.667 -> E4M3 2.75, step 0.34375: 2 -> 5.8 -> 6 -> 2.0625
    assert y[16].item() == 6 * 2.75 / 8


def test_torchao_order_block_scale_lower_clamp_and_zero_blocks():
    x = row(1.0, *([0.0] * 15), 0.0006)  # block 1: 0.0001/1 -> clamped to 2^-6, v = 0.0384 -> 0
    y = quantize_nvfp4(x, per_tensor_scale=1.0, order="torchao")
    # block 0: 1/6 -> E4M3 0.171875 (0.125 * 1.375), 1 / 0.171875 = 5.8 -> 6 -> 1.03125
    assert torch.all(y[0, 16:] == 0) and y[0, 0].item() == 6 * 0.171875
    zeros = quantize_nvfp4(torch.zeros(3, 16), order="torchao")  # s_t falls back to 1
    assert torch.equal(zeros, torch.zeros(3, 16))


def test_te_order_has_no_lower_clamp_and_zero_tensors_stay_zero():
    x = row(1.0, *([0.0] * 15), 0.0006)  # block 1: amax / 6 = 0.0001, below E4M3's 2^-10 rounding edge
    y = quantize_nvfp4(x, per_tensor_scale=1.0)
    # TE: s_b = e4m3(0.0001) = 0 (below half the smallest subnormal 2^-9): block 1 dequantizes to 0
    assert torch.all(y[0, 16:] == 0) and y[0, 0].item() == 6 * 0.171875
    z = quantize_nvfp4(torch.zeros(3, 16))  # S_enc = FLT_MAX, block scales 0: zeros, never NaN
    assert torch.equal(z, torch.zeros(3, 16))


def test_nan_and_inf_blocks():
    x = torch.ones(2, 32)
    x[0, 20] = float("nan")
    x[1, 3] = float("inf")
    y = quantize_nvfp4(x)
    assert y[0, 16:].isnan().all() and y[1, :16].isnan().all()
    assert torch.all(y[0, :16] == 1.0) and torch.all(y[1, 16:] == 1.0)  # Inf left out of the tensor amax


def test_rounding_modes_and_axis():
    x = row(6.0, 2.5, 5.0, -2.5, size=16)  # s_t = 2^-8, s_b = 256: elements unscaled
    assert quantize_nvfp4(x, per_tensor_scale=2.0**-8)[0, :4].tolist() == [6.0, 2.0, 4.0, -2.0]
    away = quantize_nvfp4(x, per_tensor_scale=2.0**-8, rounding="nearest_away")
    assert away[0, :4].tolist() == [6.0, 3.0, 6.0, -3.0]
    z = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))  # 20 rows: padded second block
    assert torch.equal(quantize_nvfp4(z, axis=0), quantize_nvfp4(z.t().contiguous()).t())


def test_stochastic_mean_and_determinism():
    x = torch.full((1000, 16), 2.5)
    x[:, 0] = 6.0  # s_b = 448 with the computed s_t: elements ~unscaled, 2.5 -> 2 or 3
    y = quantize_nvfp4(x, rounding="stochastic", seed=0)
    assert len(y[:, 1:].unique()) == 2  # the two grid neighbours (times the block scale ~1)
    assert abs(y[:, 1:].mean().item() - 2.5) < 0.01
    assert torch.equal(y, quantize_nvfp4(x, rounding="stochastic", seed=0))


def test_dtype_and_validation():
    x = torch.randn(4, 32).bfloat16()
    assert quantize_nvfp4(x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="per_tensor_scale"):
        quantize_nvfp4(x, per_tensor_scale=0.0)
    with pytest.raises(ValueError, match="rounding"):
        quantize_nvfp4(x, rounding="up")
