"""Rowwise and TE-style block FP8 scaling against a straightforward per-tile loop reference, bitwise."""

from __future__ import annotations

import math
import struct

import pytest
import torch

from recipes.fp8 import (
    E4M3,
    E5M2,
    Float8BlockScaling,
    cast_to_fp8_block_1d,
    cast_to_fp8_block_2d,
    cast_to_fp8_rowwise,
    quantize_fp8,
    quantize_fp8_block_1d,
    quantize_fp8_block_2d,
    quantize_fp8_rowwise,
)

F32 = torch.float32


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.to(torch.float64), b.to(torch.float64)
    both_nan = a.isnan() & b.isnan()
    return a.shape == b.shape and bool(((a.view(torch.int64) == b.view(torch.int64)) | both_nan).all())


def ref_scale(a: float, fp8_max: float, *, pow2: bool, eps: float, value_for_inf: float) -> float:
    """TE's compute_scale_from_amax in plain Python floats (fp64 division rounded once to fp32)."""
    if a < eps:
        a = eps
    if a == 0 or math.isinf(a) or math.isnan(a):
        return 1.0
    try:
        s = struct.unpack("f", struct.pack("f", fp8_max / a))[0]
    except OverflowError:
        s = value_for_inf
    if pow2:
        m, e = math.frexp(s)  # s = m * 2^e, m in [0.5, 1)
        s = 2.0 ** (e - 1)
    return s


def ref_tiles(x: torch.Tensor, fmt, tile: tuple[int, int], *, pow2: bool, eps: float) -> torch.Tensor:
    """Loop over (rows x cols) tiles of a 2-D tensor; partial tiles at the edges (= zero padding)."""
    out = torch.empty_like(x)
    inf_val = float(torch.finfo(x.dtype).max)
    for r0 in range(0, x.shape[0], tile[0]):
        for c0 in range(0, x.shape[1], tile[1]):
            blk = x[r0 : r0 + tile[0], c0 : c0 + tile[1]]
            finite_or_inf = blk.float().abs()[~blk.isnan()]
            a = finite_or_inf.max().item() if finite_or_inf.numel() else 0.0
            s = ref_scale(a, fmt.max, pow2=pow2, eps=eps, value_for_inf=inf_val)
            out[r0 : r0 + tile[0], c0 : c0 + tile[1]] = quantize_fp8(blk, fmt, s)
    return out


def make_data(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 3)
    flat = x.view(-1)
    flat[:: max(1, flat.numel() // 7)] *= 1e4  # outliers
    return x


@pytest.mark.parametrize("pow2", [True, False])
@pytest.mark.parametrize(("shape", "axis"), [((3, 300), -1), ((300, 5), 0), ((4, 128), 1), ((130, 1), 0)])
def test_block_1x128_matches_loop(shape, axis, pow2):
    x = make_data(shape)
    if axis == 0:  # one all-zero tile (scale 1.0)
        x[:128, -1] = 0.0
    else:
        x[-1, :128] = 0.0
    got = quantize_fp8_block_1d(x, axis=axis, power_2_scales=pow2)
    tile = (1, 128) if axis in (-1, 1) else (128, 1)
    assert same_bits(got, ref_tiles(x, E4M3, tile, pow2=pow2, eps=0.0))


def test_block_1d_leading_dims_bf16_and_e5m2():
    x = make_data((2, 3, 260), seed=1).to(torch.bfloat16)
    got = quantize_fp8_block_1d(x, E5M2)
    assert got.dtype == torch.bfloat16
    want = ref_tiles(x.reshape(6, 260), E5M2, (1, 128), pow2=True, eps=0.0).reshape(2, 3, 260)
    assert same_bits(got, want)


@pytest.mark.parametrize("pow2", [True, False])
@pytest.mark.parametrize("shape", [(200, 300), (128, 256), (5, 129)])
def test_block_128x128_matches_loop(shape, pow2):
    x = make_data(shape, seed=2)
    got = quantize_fp8_block_2d(x, power_2_scales=pow2)
    assert same_bits(got, ref_tiles(x, E4M3, (128, 128), pow2=pow2, eps=0.0))


def test_block_2d_batched():
    x = make_data((2, 130, 129), seed=3)
    got = quantize_fp8_block_2d(x)
    for b in range(2):
        assert same_bits(got[b], ref_tiles(x[b], E4M3, (128, 128), pow2=True, eps=0.0))


def test_block_scale_inv_shapes_and_values():
    x = make_data((200, 300), seed=4)
    q, sinv = cast_to_fp8_block_1d(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and sinv.shape == (200, 3)
    assert same_bits(q.float() * torch.repeat_interleave(sinv, 128, dim=1)[:, :300], quantize_fp8_block_1d(x))
    q2, sinv2 = cast_to_fp8_block_2d(x)
    assert sinv2.shape == (2, 3)
    a = x[128:, 256:].abs().max().item()
    assert sinv2[1, 2].item() == 1 / ref_scale(a, 448.0, pow2=True, eps=0.0, value_for_inf=0.0)
    _, sinv_col = cast_to_fp8_block_1d(x, axis=0)
    assert sinv_col.shape == (2, 300)


def test_block_zero_tile_nan_and_epsilon():
    x = torch.zeros(2, 256)
    x[0, 130] = 3.0
    x[1, 5] = math.nan
    x[1, 6] = 2.0
    q, sinv = cast_to_fp8_block_1d(x, power_2_scales=False)
    assert sinv[0, 0].item() == 1.0 and sinv[1, 1].item() == 1.0  # zero tiles: scale 1 (TE)
    assert sinv[1, 0].item() == pytest.approx(2.0 / 448.0)  # NaN ignored in the tile's amax
    out = quantize_fp8_block_1d(x)
    assert out[1, 5].isnan() and out[1, 6].item() == 2.0 and out[0, 130].item() == 3.0
    _, sinv_eps = cast_to_fp8_block_1d(x, power_2_scales=False, amax_epsilon=0.5)
    assert sinv_eps[0, 0].item() == pytest.approx(0.5 / 448.0)


@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("pow2", [True, False])
def test_rowwise_matches_loop(axis, pow2):
    x = make_data((6, 40), seed=5)
    x[2] = 0.0
    x[:, 3] = 0.0
    got = quantize_fp8_rowwise(x, axis=axis, power_2_scales=pow2)
    tile = (1, 40) if axis == -1 else (6, 1)
    ref = torch.empty_like(x)
    fmax = float(torch.finfo(F32).max)
    for idx in range(x.shape[0] if axis == -1 else x.shape[1]):
        sl = (idx, slice(None)) if axis == -1 else (slice(None), idx)
        a = x[sl].abs().max().item()
        s = ref_scale(a, 448.0, pow2=pow2, eps=1e-12, value_for_inf=fmax)
        ref[sl] = quantize_fp8(x[sl], E4M3, s)
    assert same_bits(got, ref)
    assert same_bits(got, ref_tiles(x, E4M3, tile, pow2=pow2, eps=1e-12))
    _, sinv = cast_to_fp8_rowwise(x, axis=axis)
    assert sinv.shape == ((6, 1) if axis == -1 else (1, 40))
    if axis == -1:  # an all-zero row: amax floored to 1e-12 (torchao), not scale 1.0
        assert sinv[2, 0].item() == 1 / ref_scale(0.0, 448.0, pow2=True, eps=1e-12, value_for_inf=fmax)


def test_float8_block_scaling_config_routes_roles():
    recipe = Float8BlockScaling()
    w = make_data((200, 300), seed=6)
    assert same_bits(recipe.quantize(w, "weight"), quantize_fp8_block_2d(w))
    assert same_bits(recipe.quantize(w, "input"), quantize_fp8_block_1d(w))
    assert same_bits(recipe.quantize(w, "grad_output", axis=0), quantize_fp8_block_1d(w, axis=0))
    hybrid = Float8BlockScaling(fp8_format="HYBRID", power_2_scales=False)
    assert same_bits(hybrid.quantize(w, "grad_output"), quantize_fp8_block_1d(w, E5M2, power_2_scales=False))
    with pytest.raises(ValueError, match="w_block_scaling_dim"):
        Float8BlockScaling(w_block_scaling_dim=3)
    with pytest.raises(ValueError, match=">= 2 dims"):
        quantize_fp8_block_2d(torch.ones(5))
