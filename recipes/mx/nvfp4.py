"""NVFP4 fake quantization: FP4 E2M1 elements, 16-element blocks, E4M3 block scales, FP32 tensor scale.

Numerics (NVIDIA / Transformer Engine two-level recipe, arithmetic in the
order torchao's ``nvfp4_quantize`` uses, which it takes from NVIDIA's kernels):

* Per-tensor scale ``s_t = amax_tensor / (6 * 448)`` (float32), where
  ``amax_tensor`` is the max of the *finite* block amaxes, unless
  ``per_tensor_scale`` is given. If ``s_t`` is 0 (all-zero tensor) or ``1/s_t``
  overflows float32, ``s_t = 1``.
* Block scale (16 elements along ``axis``, last block zero-padded):
  ``s_b = e4m3(clamp((amax_block / 6) / s_t, 2^-6, 448))``, the cast rounding
  to nearest-even. With the computed ``s_t`` the block holding the tensor's
  amax gets ``s_b`` ~ 448. The lower clamp at E4M3's smallest normal is
  torchao's: an all-zero (or relatively tiny) block gets ``s_b = 2^-6`` instead
  of a zero scale (its elements then round to 0 or near it).
* Elements: ``v = x * ((1 / s_t) / s_b)``, saturated to +-6 and rounded onto
  the E2M1 grid {0, 0.5, 1, 1.5, 2, 3, 4, 6} with ``rounding`` (same modes as
  ``quantize_mx``); output ``w * (s_t * s_b)``. Both products are float32
  roundings (``s_t`` is not a power of two), exactly as torchao computes them.
* A block holding NaN or +-Inf dequantizes to all NaN (it is left out of
  ``amax_tensor``).

2-D weight tiles (:func:`quantize_nvfp4_2d`, TE's NVFP4 weights): the same
arithmetic with the block amax taken over a 16 x 16 tile of a 2-D tensor, so
one quantized copy serves the forward (K-blocked) and the dgrad (N-blocked)
GEMM; padded tiles are zero-filled.

Random Hadamard transform (:func:`hadamard_tokens`, TE's wgrad RHT): each
group of 16 consecutive rows (tokens) of a ``[M, C]`` operand is multiplied by
``H diag(s) / 4``, ``H`` the 16 x 16 Sylvester Hadamard matrix and ``s`` a
fixed random sign vector (seed ``RHT_SEED``), in float32. Rows are zero-padded
to a multiple of 16 and the padding is kept. Applied to both wgrad operands it
leaves ``g^T x`` unchanged in real arithmetic (``H`` is orthogonal); only the
quantization sees rotated, outlier-spread values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from recipes.mx.core import block_amax, block_layout, from_blocks, round_elements, to_blocks
from recipes.mx.formats import FORMATS, check_rounding
from recipes.mx.quantize import check_input, uniform_noise

__all__ = [
    "HADAMARD_SIZE",
    "NVFP4_BLOCK_SIZE",
    "RHT_SEED",
    "hadamard_tokens",
    "nvfp4_tensor_scale",
    "quantize_nvfp4",
    "quantize_nvfp4_2d",
    "random_hadamard",
    "sylvester_hadamard",
]

NVFP4_BLOCK_SIZE = 16
#: seed of TE-style random Hadamard sign vectors (fixed, as TE's)
RHT_SEED = 0x5EED
HADAMARD_SIZE = 16
_FP4 = FORMATS["fp4_e2m1"]
_E4M3_MAX = 448.0
_E4M3_MIN_NORMAL = 2.0**-6


def nvfp4_tensor_scale(amax: torch.Tensor) -> torch.Tensor:
    """``amax / (6 * 448)`` in float32, or 1.0 where that is 0 or its reciprocal overflows."""
    s = amax.to(torch.float32) / (_FP4.max_norm * _E4M3_MAX)
    ok = (s > 0) & torch.isfinite(1.0 / s)
    return torch.where(ok, s, torch.ones_like(s))


def quantize_nvfp4(
    x: torch.Tensor,
    *,
    axis: int = -1,
    rounding: str = "nearest_even",
    per_tensor_scale: float | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Fake-quantize ``x`` to NVFP4 (module docstring); returns ``x``'s shape and dtype."""
    check_input(x)
    check_rounding(rounding)
    layout = block_layout(x.shape, block_size=NVFP4_BLOCK_SIZE, axis=axis)
    if x.numel() == 0:
        return x.clone()
    if isinstance(per_tensor_scale, (int, float)) and not (0 < per_tensor_scale < math.inf):
        raise ValueError(f"per_tensor_scale must be a positive finite number, got {per_tensor_scale}")
    xb = to_blocks(x.float(), layout)
    amax_b = block_amax(xb)
    finite = torch.isfinite(amax_b)
    if per_tensor_scale is None:
        s_t = nvfp4_tensor_scale(torch.where(finite, amax_b, 0.0).amax())
    else:
        s_t = torch.as_tensor(per_tensor_scale, dtype=torch.float32, device=x.device)
    s_b = nvfp4_block_scales(amax_b, s_t)
    noise = None
    if rounding == "stochastic":
        noise = to_blocks(uniform_noise(x, generator=generator, seed=seed), layout)
    y = nvfp4_blocks(xb, s_t, s_b, finite, rounding=rounding, noise=noise)
    return from_blocks(y, layout).to(x.dtype)


def nvfp4_block_scales(amax_b: torch.Tensor, s_t: torch.Tensor) -> torch.Tensor:
    """E4M3 block scales (as float32) of blocks with amax ``amax_b`` under tensor scale ``s_t``:
    ``amax / 6 / s_t`` clamped to E4M3's normal range, rounded to the nearest E4M3 value."""
    s_b = (amax_b / _FP4.max_norm) / s_t
    return s_b.clamp_(_E4M3_MIN_NORMAL, _E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)


def nvfp4_blocks(
    xb: torch.Tensor,
    s_t: torch.Tensor,
    s_b: torch.Tensor,
    finite: torch.Tensor,
    *,
    rounding: str = "nearest_even",
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantized NVFP4 blocks of ``xb`` (float32, blocked) for given tensor and block scales;
    blocks where ``finite`` is False come out NaN. ``quantize_nvfp4``'s element step, public so
    that statistics can requantize under another block scale (``recipes.blockstats``)."""
    v = xb * ((1.0 / s_t) / s_b).masked_fill_(~finite, math.nan)
    r, q = round_elements(v, fmt=_FP4, rounding=rounding, sign_of=xb, noise=noise)
    return r.mul_(q).mul_((s_t * s_b).masked_fill_(~finite, math.nan))


# ---------------------------------------------------------------------- 2-D weight tiles


def quantize_nvfp4_2d(
    w: torch.Tensor, *, tile: int = NVFP4_BLOCK_SIZE, rounding: str = "nearest_even"
) -> torch.Tensor:
    """NVFP4 with ``tile`` x ``tile`` blocks over a 2-D tensor (TE's weight quantization).

    The arithmetic of :func:`quantize_nvfp4` with the block amax
    taken over a square tile: ``s_t = amax_tensor / (6*448)``,
    ``s_b = e4m3(clamp((amax_tile / 6) / s_t, 2^-6, 448))``, elements
    ``round(x * ((1/s_t)/s_b))`` on the E2M1 grid (saturating at 6), output
    ``w * (s_t * s_b)``. The same values serve the forward (K-blocked) and the
    dgrad (N-blocked) GEMM, which is why TE uses it. Padded tiles are zero-filled.
    """
    if w.dim() != 2:
        raise ValueError(f"2-D NVFP4 tiles need a 2-D tensor, got shape {tuple(w.shape)}")
    n, k = w.shape
    pn, pk = (-n) % tile, (-k) % tile
    w32 = F.pad(w.float(), (0, pk, 0, pn))
    t = w32.view((n + pn) // tile, tile, (k + pk) // tile, tile)
    amax_b = torch.maximum(t.amax(dim=(1, 3), keepdim=True), t.amin(dim=(1, 3), keepdim=True).neg())
    finite = torch.isfinite(amax_b)
    s_t = nvfp4_tensor_scale(torch.where(finite, amax_b, 0.0).amax())
    s_b = ((amax_b / _FP4.max_norm) / s_t).clamp_(_E4M3_MIN_NORMAL, _E4M3_MAX)
    s_b = s_b.to(torch.float8_e4m3fn).to(torch.float32)
    v = t * ((1.0 / s_t) / s_b).masked_fill_(~finite, math.nan)
    r, q = round_elements(v, fmt=_FP4, rounding=rounding, sign_of=t, noise=None)
    y = r.mul_(q).mul_((s_t * s_b).masked_fill_(~finite, math.nan))
    return y.view(n + pn, k + pk)[:n, :k].to(w.dtype)


# ---------------------------------------------------------------------- random Hadamard transform


def sylvester_hadamard(n: int) -> torch.Tensor:
    """The n x n Sylvester Hadamard matrix (entries +-1), n a power of two."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


_RHT_CACHE: dict[tuple[torch.device, int], torch.Tensor] = {}


def random_hadamard(device: torch.device, n: int = HADAMARD_SIZE) -> torch.Tensor:
    """Orthonormal ``H diag(s) / sqrt(n)`` with a fixed random sign vector ``s`` (seed ``RHT_SEED``)."""
    key = (device, n)
    if key not in _RHT_CACHE:
        gen = torch.Generator().manual_seed(RHT_SEED)
        signs = torch.randint(0, 2, (n,), generator=gen).float().mul_(2).sub_(1)
        _RHT_CACHE[key] = (sylvester_hadamard(n) * signs / math.sqrt(n)).to(device)
    return _RHT_CACHE[key]


def hadamard_tokens(x: torch.Tensor, n: int = HADAMARD_SIZE) -> torch.Tensor:
    """Apply the random Hadamard matrix to each group of ``n`` consecutive rows of ``x [M, C]``.

    Rows are zero-padded to a multiple of ``n`` and the padding is *kept*: both
    wgrad operands are transformed alike and ``H`` is orthogonal, so
    ``(H g)^T (H x) = g^T x`` exactly in real arithmetic; only quantization
    (and float32 rounding) sees the rotated values.
    """
    m, c = x.shape
    pad = (-m) % n
    xp = F.pad(x, (0, 0, 0, pad)) if pad else x
    h = random_hadamard(x.device, n)
    return torch.matmul(h, xp.view(-1, n, c)).view(m + pad, c)
