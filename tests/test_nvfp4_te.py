"""NVFP4 in Transformer Engine's scale arithmetic, against an independent scalar transcription.

The reference below re-derives TE's ``NVFP4QuantizerRef._quantize_blockwise_reference``
(``transformer_engine/pytorch/custom_recipes/quantization_nvfp4.py``) one block at a time with
NumPy scalars: every product and quotient a ``np.float32`` rounding in TE's order, the E4M3 block
scale rounded to nearest-even on an explicitly enumerated E4M3 grid, the E2M1 element rounded by
TE's own threshold table (``cast_to_fp4x2``). It shares no code with ``recipes.mx``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recipes.mx import quantize_nvfp4
from recipes.mx.nvfp4 import (
    TE_WGRAD_SIGNS,
    hadamard_tokens,
    nvfp4_tensor_scale,
    quantize_nvfp4_2d,
    random_hadamard,
    sylvester_hadamard,
)

F32 = np.float32
FLT_MAX = F32(np.finfo(np.float32).max)


def _e4m3_grid() -> np.ndarray:
    """Every non-negative finite E4M3 (fn) value: subnormals m/8 * 2^-6, normals up to 448."""
    vals = [m / 8 * 2.0**-6 for m in range(8)]
    vals += [(1 + m / 8) * 2.0**e for e in range(-6, 9) for m in range(8)]
    return np.array([v for v in vals if v <= 448.0], dtype=np.float64)


E4M3 = _e4m3_grid()


def e4m3_rne(v: float) -> float:
    """Round a non-negative value (<= 448) to the nearest E4M3 value, ties to the even code."""
    i = int(np.searchsorted(E4M3, v))
    if i < len(E4M3) and E4M3[i] == v:
        return float(E4M3[i])
    lo, hi = E4M3[i - 1], E4M3[min(i, len(E4M3) - 1)]
    if v - lo != hi - v:
        return float(lo if v - lo < hi - v else hi)
    return float(lo if (i - 1) % 2 == 0 else hi)  # codes alternate even/odd along the grid


def e2m1_te(v: float) -> float:
    """TE's ``cast_to_fp4x2`` thresholds (round to nearest, ties to even), on a clamped value."""
    a = abs(v)
    for hi, q, inclusive in ((0.25, 0.0, True), (0.75, 0.5, False), (1.25, 1.0, True), (1.75, 1.5, False),
                             (2.5, 2.0, True), (3.5, 3.0, False), (5.0, 4.0, True)):  # fmt: skip
        if a < hi or (inclusive and a == hi):
            return float(np.copysign(q, v))
    return float(np.copysign(6.0, v))


def te_reference(x: np.ndarray) -> np.ndarray:
    """Dequantized NVFP4 of a 2-D float32 array, 1x16 blocks along the last dim (TE's order)."""
    x = x.astype(np.float32)
    amax_t = F32(np.abs(x).max())
    with np.errstate(over="ignore"):  # 2688 / amax overflows for tiny tensors: TE caps it
        s_enc = F32(min(F32(F32(6.0) * F32(448.0)) / amax_t, FLT_MAX)) if amax_t > 0 else FLT_MAX
    if s_enc == 0:
        s_enc = F32(1.0)
    s_dec_global = F32(F32(1.0) / s_enc)
    mult = F32(s_enc * F32(F32(1.0) / F32(6.0)))
    dec = F32(amax_t / F32(2688.0))  # TE's GEMM: alpha = amax_a * amax_b / (6*6*448*448)
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        for b in range(0, x.shape[1], 16):
            blk = x[r, b : b + 16]
            s_b = F32(e4m3_rne(min(float(F32(F32(np.abs(blk).max()) * mult)), 448.0)))
            enc = F32(min(F32(F32(1.0) / F32(s_b * s_dec_global)), FLT_MAX)) if s_b > 0 else FLT_MAX
            for j, v in enumerate(blk):
                w = e2m1_te(float(np.clip(F32(v * enc), -6.0, 6.0)))
                out[r, b + j] = F32(F32(w) * F32(dec * s_b))
    return out


def test_the_tie_that_torchao_order_rounds_the_other_way():
    """One block, amax 48, an element 14: TE's factor is exactly 0.125, 14 lands on the E2M1 tie
    1.75 and rounds (to even) to 2 -> 16; torchao's factor is one ulp below, 1.7499999 -> 12."""
    x = torch.zeros(1, 16)
    x[0, 0], x[0, 1] = 48.0, 14.0
    assert quantize_nvfp4(x)[0, 1].item() == 16.0
    assert quantize_nvfp4(x, order="torchao")[0, 1].item() == 12.0
    assert te_reference(x.numpy())[0, 1] == 16.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_normal_inputs_equal_the_transcription_bit_for_bit(seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(24, 64, generator=g) * torch.logspace(-3, 2, 64)).bfloat16().float()
    got = quantize_nvfp4(x).numpy()
    np.testing.assert_array_equal(got.view(np.int32), te_reference(x.numpy()).view(np.int32))


def test_the_two_orders_differ_on_a_small_fraction_of_elements():
    x = torch.randn(512, 256, generator=torch.Generator().manual_seed(0)).bfloat16().float()
    diff = (quantize_nvfp4(x) != quantize_nvfp4(x, order="torchao")).float().mean().item()
    assert 0 < diff < 0.01  # ~0.2 % (the estimate): midpoints only


def test_tiny_tensor_is_quantized_not_flushed():
    """2688 / amax overflows float32: TE caps S_enc at FLT_MAX and quantizes normally; torchao's
    order falls back to s_t = 1 and every block underflows to zero."""
    x = torch.zeros(1, 16)
    x[0, :4] = torch.tensor([6.0, 3.0, -1.5, 0.5]) * 1e-37
    got = quantize_nvfp4(x)
    np.testing.assert_array_equal(got.numpy(), te_reference(x.numpy()))
    assert torch.all(got[0, :4] != 0) and torch.allclose(got[0, :4], x[0, :4], rtol=0.15)
    assert torch.all(quantize_nvfp4(x, order="torchao") == 0)


def test_subnormal_and_zero_block_scales():
    """Tensor amax 2688 -> S_enc = 1. Block 1 (amax 6 * 2^-8): s_b = 2^-8, an E4M3 subnormal, kept
    (torchao clamps it up to 2^-6); block 2 (amax 6 * 2^-13): s_b rounds to 0, the factor is
    FLT_MAX and the block dequantizes to exact zeros, never NaN."""
    x = torch.zeros(1, 48)
    x[0, 0] = 2688.0
    x[0, 16:19] = torch.tensor([6.0, -3.0, 1.0]) * 2.0**-8
    x[0, 32:34] = torch.tensor([6.0, 2.0]) * 2.0**-13
    ts = nvfp4_tensor_scale(torch.tensor(2688.0))
    assert ts.enc.item() == 1.0 and ts.dec.item() == 1.0
    got = quantize_nvfp4(x)
    assert got[0, 16:19].tolist() == [6 * 2.0**-8, -3 * 2.0**-8, 1 * 2.0**-8]  # exact on the subnormal scale
    assert torch.all(got[0, 32:48] == 0) and not got.isnan().any()
    np.testing.assert_array_equal(got.numpy(), te_reference(x.numpy()))
    # torchao's scale clamped to 2^-6 (factor 64): 1.5 -> 1.5, -0.75 -> tie -> -1, 0.25 -> tie -> 0
    ao = quantize_nvfp4(x, order="torchao")
    assert ao[0, 16:19].tolist() == [6 * 2.0**-8, -4 * 2.0**-8, 0.0]


def test_2d_tiles_follow_the_same_order():
    """A 16 x 16 tile holding the 1x16 tie row: TE's order rounds 14 to 16 in the tile too."""
    w = torch.zeros(16, 32)
    w[0, 0], w[0, 1] = 48.0, 14.0
    assert quantize_nvfp4_2d(w)[0, 1].item() == 16.0
    assert quantize_nvfp4_2d(w, order="torchao")[0, 1].item() == 12.0


def test_hadamard_uses_te_sign_vector_in_te_layout():
    """TE transforms the transposed operand: ``x_t.view(-1, 16) @ (diag(s) H) / 4`` (its
    ``_apply_rht`` with ``get_wgrad_sign_vector``). lowbit's token-major form must equal it."""
    assert TE_WGRAD_SIGNS == (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    signs = torch.tensor(TE_WGRAD_SIGNS, dtype=torch.float32)
    rht = (torch.diag(signs) @ sylvester_hadamard(16)) * 0.25
    te = (x.t().contiguous().view(-1, 16) @ rht).view(8, 32).t()
    torch.testing.assert_close(hadamard_tokens(x), te, rtol=0, atol=1e-6)
    h = random_hadamard(torch.device("cpu"))
    torch.testing.assert_close(h @ h.t(), torch.eye(16), rtol=0, atol=1e-6)


def test_hadamard_refuses_a_token_count_that_is_not_a_multiple_of_16():
    with pytest.raises(ValueError, match="multiple of 16"):
        hadamard_tokens(torch.ones(20, 4))
    with pytest.raises(ValueError, match="16 x 16"):
        random_hadamard(torch.device("cpu"), 32)


def test_a_block_of_negative_zeros_stays_zero():
    """Gradients hold -0.0: such a block's amax is -0.0; its scale must be +0 (factor FLT_MAX), not
    -0 (factor -inf, and -inf * 0 = NaN)."""
    x = torch.zeros(2, 32)
    x[0, :16], x[1, 0] = -0.0, 3.0
    for rounding in ("nearest_even", "stochastic"):
        y = quantize_nvfp4(x, rounding=rounding, seed=0)
        assert not y.isnan().any() and torch.all(y[0] == 0)
