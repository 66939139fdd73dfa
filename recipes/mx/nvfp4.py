"""NVFP4 fake quantization: FP4 E2M1 elements, 16-element blocks, E4M3 block scales, FP32 tensor scale.

Numerics (NVIDIA's two-level recipe). Two orders of the FP32 scale arithmetic are implemented;
they differ by one ulp in the per-element factor, which flips an element that lands on an E2M1
rounding midpoint (about 0.2 % of elements of BF16 normal inputs):

``order="te"`` (the default; Transformer Engine's pure-PyTorch reference quantizer
``NVFP4QuantizerRef._quantize_blockwise_reference``, tested against a transcription of it; TE's
``NVFP4BlockScaling`` CUDA kernels are meant to compute the same, unverified here: no Blackwell GPU):

* Global encode scale ``S_enc = min(2688 / amax_t, FLT_MAX)`` (2688 = 6 x 448, float32), where
  ``amax_t`` is the max of the *finite* block amaxes (lowbit's choice: TE's reference takes the max
  over every element, so an Inf there gives ``S_enc = 2688 / inf = 0 -> 1``); ``S_enc = 1`` where
  it is 0. An all-zero or
  tiny tensor is therefore quantized normally (``S_enc`` capped at FLT_MAX), never flushed.
* Block scale (16 elements along ``axis``, last block zero-padded):
  ``s_b = e4m3(min(min(amax_b * (S_enc * fp32(1/6)), FLT_MAX), 448))``, the cast rounding to
  nearest-even. No lower clamp: a block scale may be an E4M3 subnormal, or zero (a block far
  below the tensor's amax).
* Per-element encode factor ``min(1 / (s_b * (1 / S_enc)), FLT_MAX)``, in that order (a zero
  block scale gives FLT_MAX; its elements then dequantize to 0).
* Output ``w * (s_t * s_b)`` with the decode scale ``s_t = amax_t / 2688``: TE's GEMM applies
  ``alpha = amax_a * amax_b / (6 * 6 * 448 * 448)``, i.e. ``amax / 2688`` per operand.

``order="torchao"`` (torchao's ``nvfp4_quantize``, kept for comparisons with torchao):

* ``s_t = amax_t / 2688``; lowbit's addition, not torchao's: if ``s_t`` is 0 or ``1 / s_t``
  overflows, ``s_t = 1`` (every block of such a tensor then underflows to zero; torchao itself
  returns NaN for an all-zero tensor and garbage for a ~1e-37 one).
* ``s_b = e4m3(clamp((amax_b / 6) / s_t, 2^-6, 448))``: torchao clamps block scales below at
  E4M3's smallest normal.
* Factor ``(1 / s_t) / s_b``; output ``w * (s_t * s_b)``.

Both: elements ``v = x * factor`` saturate to +-6 and round onto the E2M1 grid
{0, 0.5, 1, 1.5, 2, 3, 4, 6} with ``rounding`` (same modes as ``quantize_mx``); every product is
a float32 rounding. A block holding NaN or +-Inf dequantizes to all NaN (lowbit leaves it out of
``amax_t``; see ``S_enc`` above for TE's reference). ``per_tensor_scale`` fixes ``s_t`` (TE order: ``S_enc = min(1 / s_t, FLT_MAX)``).

2-D weight tiles (:func:`quantize_nvfp4_2d`, TE's NVFP4 weights): the same arithmetic with the
block amax taken over a 16 x 16 tile of a 2-D tensor, so one quantized copy serves the forward
(K-blocked) and the dgrad (N-blocked) GEMM; padded tiles are zero-filled.

Random Hadamard transform (:func:`hadamard_tokens`, TE's wgrad RHT): each group of 16
consecutive rows (tokens) of a ``[M, C]`` operand is multiplied by ``H diag(s) / 4``, ``H`` the
16 x 16 Sylvester Hadamard matrix and ``s`` TE's fixed wgrad sign vector
(:data:`TE_WGRAD_SIGNS`, TE's ``get_wgrad_sign_vector``), in float32. TE applies
``x_blocks @ (diag(s) H) / 4`` to the transposed operand, i.e. the same map on each column
vector of 16 tokens. ``M`` must be a multiple of 16, as TE requires (``ValueError`` otherwise;
the recipe refuses such a batch before start-up). Applied to both wgrad operands it leaves
``g^T x`` unchanged in real arithmetic (``H`` is orthogonal); only the quantization sees
rotated, outlier-spread values. Not reproduced: TE's reference runs the transform in the
operand's dtype (BF16), its fused kernel in FP32 before quantizing; lowbit uses FP32.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from recipes.mx.core import block_amax, block_layout, from_blocks, round_elements, to_blocks
from recipes.mx.formats import FORMATS, check_rounding
from recipes.mx.quantize import check_input, uniform_noise

__all__ = [
    "HADAMARD_SIZE",
    "NVFP4_BLOCK_SIZE",
    "NVFP4_ORDERS",
    "TE_WGRAD_SIGNS",
    "TensorScale",
    "hadamard_tokens",
    "nvfp4_block_scales",
    "nvfp4_blocks",
    "nvfp4_codes",
    "nvfp4_codes_2d",
    "nvfp4_tensor_scale",
    "quantize_nvfp4",
    "quantize_nvfp4_2d",
    "random_hadamard",
    "sylvester_hadamard",
]

NVFP4_BLOCK_SIZE = 16
HADAMARD_SIZE = 16
#: the orders of the scale arithmetic (module docstring)
NVFP4_ORDERS = ("te", "torchao")
#: TE's fixed sign vector of the wgrad random Hadamard transform (``get_wgrad_sign_vector``)
TE_WGRAD_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)
_FP4 = FORMATS["fp4_e2m1"]
_E4M3_MAX = 448.0
_E4M3_MIN_NORMAL = 2.0**-6
_FLT_MAX = torch.finfo(torch.float32).max
_ENC_RANGE = _FP4.max_norm * _E4M3_MAX  # 2688
_RECIP_6 = float(torch.tensor(1.0 / _FP4.max_norm, dtype=torch.float32))  # fp32(1/6), as TE


class TensorScale(NamedTuple):
    """The FP32 tensor-level scales of one NVFP4 tensor: ``dec`` (``s_t``) dequantizes, ``enc``
    (TE's ``S_enc``; torchao order: ``1 / s_t``) encodes; ``order`` names the arithmetic."""

    dec: torch.Tensor
    enc: torch.Tensor
    order: str


def _check_order(order: str) -> None:
    if order not in NVFP4_ORDERS:
        raise ValueError(f"NVFP4 scale order must be one of {NVFP4_ORDERS}, got {order!r}")


def nvfp4_tensor_scale(amax: torch.Tensor, *, order: str = "te") -> TensorScale:
    """The tensor scales for a tensor whose finite amax is ``amax`` (module docstring)."""
    _check_order(order)
    amax = amax.to(torch.float32)
    if order == "te":
        # a tensor quotient: torch computes ``scalar / tensor`` as a reciprocal times the scalar
        enc = torch.clamp(torch.full_like(amax, _ENC_RANGE) / amax, max=_FLT_MAX)
        enc = torch.where(enc == 0, torch.ones_like(enc), enc)
        return TensorScale(amax / _ENC_RANGE, enc, order)
    s = amax / _ENC_RANGE
    ok = (s > 0) & torch.isfinite(1.0 / s)
    s = torch.where(ok, s, torch.ones_like(s))
    return TensorScale(s, 1.0 / s, order)


def fixed_tensor_scale(s_t: float | torch.Tensor, *, order: str = "te", device=None) -> TensorScale:
    """The tensor scales for a given decode scale ``s_t`` (``per_tensor_scale``)."""
    _check_order(order)
    s = torch.as_tensor(s_t, dtype=torch.float32, device=device)
    enc = torch.clamp(1.0 / s, max=_FLT_MAX) if order == "te" else 1.0 / s
    return TensorScale(s, enc, order)


def quantize_nvfp4(
    x: torch.Tensor,
    *,
    axis: int = -1,
    rounding: str = "nearest_even",
    per_tensor_scale: float | torch.Tensor | None = None,
    order: str = "te",
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Fake-quantize ``x`` to NVFP4 (module docstring); returns ``x``'s shape and dtype."""
    if x.numel() == 0:
        _checks(x, rounding, order, axis)
        return x.clone()
    y, _ = _nvfp4_1d(x, axis, rounding, per_tensor_scale, order, generator, seed, codes=False)
    return y.to(x.dtype)


def nvfp4_codes(
    x: torch.Tensor,
    *,
    axis: int = -1,
    rounding: str = "nearest_even",
    order: str = "te",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c, s_t)``: ``x``'s NVFP4 elements times their E4M3 block scales (float32, ``x``'s shape;
    NaN blocks NaN) and the FP32 decode scale ``s_t`` (0-d), the operands of an NVFP4 GEMM that
    applies ``s_t`` to its accumulator, as TE's ``alpha`` does. ``c`` is exact in BF16 (an E2M1
    value, <= 2 significant bits, times an E4M3 one, <= 4, within 2^-10 .. 2688); the same
    elements and block scales as :func:`quantize_nvfp4` (same random numbers under stochastic
    rounding), whose dequantized value ``e * fp32(s_t * s_b)`` rounds the scale product first."""
    if x.numel() == 0:
        _checks(x, rounding, order, axis)
        return x.float(), torch.ones((), device=x.device)
    return _nvfp4_1d(x, axis, rounding, None, order, generator, None, codes=True)


def _checks(x: torch.Tensor, rounding: str, order: str, axis: int):
    check_input(x)
    check_rounding(rounding)
    _check_order(order)
    return block_layout(x.shape, block_size=NVFP4_BLOCK_SIZE, axis=axis)


def _nvfp4_1d(x, axis, rounding, per_tensor_scale, order, generator, seed, *, codes: bool):
    """1 x 16 blocks along ``axis``: dequantized values (or, with ``codes``, elements times block
    scales) as float32 of ``x``'s shape, and the decode scale ``s_t``."""
    layout = _checks(x, rounding, order, axis)
    if isinstance(per_tensor_scale, (int, float)) and not (0 < per_tensor_scale < math.inf):
        raise ValueError(f"per_tensor_scale must be a positive finite number, got {per_tensor_scale}")
    xb = to_blocks(x.float(), layout)
    amax_b = block_amax(xb)
    finite = torch.isfinite(amax_b)
    if per_tensor_scale is None:
        ts = nvfp4_tensor_scale(torch.where(finite, amax_b, 0.0).amax(), order=order)
    else:
        ts = fixed_tensor_scale(per_tensor_scale, order=order, device=x.device)
    s_b = nvfp4_block_scales(amax_b, ts)
    noise = None
    if rounding == "stochastic":
        noise = to_blocks(uniform_noise(x, generator=generator, seed=seed), layout)
    y = nvfp4_blocks(xb, ts, s_b, finite, rounding=rounding, noise=noise, codes=codes)
    return from_blocks(y, layout), ts.dec


def nvfp4_unrounded_block_scales(amax_b: torch.Tensor, ts: TensorScale) -> torch.Tensor:
    """The block scales of blocks with amax ``amax_b`` before their E4M3 rounding (float32,
    clamped as the order clamps them); ``recipes.blockstats`` rounds them the other way too."""
    if ts.order == "te":
        # abs: an all -0.0 block has amax -0.0 and its factor would be -inf (-inf * 0 = NaN)
        return torch.clamp(amax_b.abs() * (ts.enc * _RECIP_6), max=_E4M3_MAX)  # min(.., FLT_MAX) implied
    return ((amax_b / _FP4.max_norm) / ts.dec).clamp_(_E4M3_MIN_NORMAL, _E4M3_MAX)


def nvfp4_block_scales(amax_b: torch.Tensor, ts: TensorScale) -> torch.Tensor:
    """E4M3 block scales (as float32) of blocks with amax ``amax_b``: the unrounded scale rounded
    to the nearest E4M3 value (nearest-even)."""
    return nvfp4_unrounded_block_scales(amax_b, ts).to(torch.float8_e4m3fn).to(torch.float32)


def nvfp4_element_factor(s_b: torch.Tensor, ts: TensorScale) -> torch.Tensor:
    """The factor each element of a block with (E4M3-valued) scale ``s_b`` is multiplied by."""
    if ts.order == "te":
        return torch.clamp(1.0 / (s_b * (1.0 / ts.enc)), max=_FLT_MAX)
    return ts.enc / s_b


def nvfp4_blocks(
    xb: torch.Tensor,
    ts: TensorScale,
    s_b: torch.Tensor,
    finite: torch.Tensor,
    *,
    rounding: str = "nearest_even",
    noise: torch.Tensor | None = None,
    codes: bool = False,
) -> torch.Tensor:
    """Dequantized NVFP4 blocks of ``xb`` (float32, blocked) for given tensor and block scales;
    blocks where ``finite`` is False come out NaN. ``quantize_nvfp4``'s element step, public so
    that statistics can requantize under another block scale (``recipes.blockstats``). With
    ``codes``: the elements times ``s_b`` only (``s_t`` left to the GEMM, :func:`nvfp4_codes`)."""
    v = xb * nvfp4_element_factor(s_b, ts).masked_fill_(~finite, math.nan)
    r, q = round_elements(v, fmt=_FP4, rounding=rounding, sign_of=xb, noise=noise)
    scale = s_b.masked_fill(~finite, math.nan) if codes else (ts.dec * s_b).masked_fill_(~finite, math.nan)
    return r.mul_(q).mul_(scale)


# ---------------------------------------------------------------------- 2-D weight tiles


def quantize_nvfp4_2d(
    w: torch.Tensor, *, tile: int = NVFP4_BLOCK_SIZE, rounding: str = "nearest_even", order: str = "te"
) -> torch.Tensor:
    """NVFP4 with ``tile`` x ``tile`` blocks over a 2-D tensor (TE's weight quantization).

    The arithmetic of :func:`quantize_nvfp4` (in ``order``) with the block amax taken over a
    square tile. The same values serve the forward (K-blocked) and the dgrad (N-blocked) GEMM,
    which is why TE uses it. Padded tiles are zero-filled.
    """
    y, _ = _nvfp4_2d(w, tile, rounding, order, codes=False)
    return y.to(w.dtype)


def nvfp4_codes_2d(
    w: torch.Tensor, *, tile: int = NVFP4_BLOCK_SIZE, rounding: str = "nearest_even", order: str = "te"
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nvfp4_codes` for :func:`quantize_nvfp4_2d`'s square tiles."""
    return _nvfp4_2d(w, tile, rounding, order, codes=True)


def _nvfp4_2d(w: torch.Tensor, tile: int, rounding: str, order: str, *, codes: bool):
    if w.dim() != 2:
        raise ValueError(f"2-D NVFP4 tiles need a 2-D tensor, got shape {tuple(w.shape)}")
    n, k = w.shape
    pn, pk = (-n) % tile, (-k) % tile
    w32 = F.pad(w.float(), (0, pk, 0, pn))
    t = w32.view((n + pn) // tile, tile, (k + pk) // tile, tile)
    amax_b = torch.maximum(t.amax(dim=(1, 3), keepdim=True), t.amin(dim=(1, 3), keepdim=True).neg())
    finite = torch.isfinite(amax_b)
    ts = nvfp4_tensor_scale(torch.where(finite, amax_b, 0.0).amax(), order=order)
    y = nvfp4_blocks(t, ts, nvfp4_block_scales(amax_b, ts), finite, rounding=rounding, codes=codes)
    return y.view(n + pn, k + pk)[:n, :k], ts.dec


# ---------------------------------------------------------------------- random Hadamard transform


def sylvester_hadamard(n: int) -> torch.Tensor:
    """The n x n Sylvester Hadamard matrix (entries +-1), n a power of two."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


_RHT_CACHE: dict[tuple[torch.device, int], torch.Tensor] = {}


def random_hadamard(device: torch.device, n: int = HADAMARD_SIZE) -> torch.Tensor:
    """Orthonormal ``H diag(s) / sqrt(n)`` with TE's wgrad sign vector ``s`` (n = 16 only, as TE)."""
    if n != HADAMARD_SIZE:
        raise ValueError(f"the Hadamard transform is {HADAMARD_SIZE} x {HADAMARD_SIZE} (TE's), got n={n}")
    key = (device, n)
    if key not in _RHT_CACHE:
        signs = torch.tensor(TE_WGRAD_SIGNS, dtype=torch.float32)
        _RHT_CACHE[key] = (sylvester_hadamard(n) * signs / math.sqrt(n)).to(device)
    return _RHT_CACHE[key]


def hadamard_tokens(x: torch.Tensor, n: int = HADAMARD_SIZE) -> torch.Tensor:
    """Apply the random Hadamard matrix to each group of ``n`` consecutive rows of ``x [M, C]``.

    ``M`` must be a multiple of ``n`` (TE refuses other shapes; so does lowbit, not padding).
    Both wgrad operands are transformed alike and ``H`` is orthogonal, so
    ``(H g)^T (H x) = g^T x`` exactly in real arithmetic; only quantization
    (and float32 rounding) sees the rotated values.
    """
    m, c = x.shape
    if m % n:
        raise ValueError(
            f"the wgrad Hadamard transform needs the token count ({m}) to be a multiple of {n}, as TE does"
        )
    h = random_hadamard(x.device, n)
    return torch.matmul(h, x.view(-1, n, c)).view(m, c)
