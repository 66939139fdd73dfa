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
"""

from __future__ import annotations

import math

import torch

from recipes.mx.core import block_amax, block_layout, from_blocks, round_elements, to_blocks
from recipes.mx.formats import FORMATS, check_rounding
from recipes.mx.quantize import check_input, uniform_noise

__all__ = ["NVFP4_BLOCK_SIZE", "nvfp4_tensor_scale", "quantize_nvfp4"]

NVFP4_BLOCK_SIZE = 16
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
    s_b = (amax_b / _FP4.max_norm) / s_t
    s_b = s_b.clamp_(_E4M3_MIN_NORMAL, _E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    v = xb * ((1.0 / s_t) / s_b).masked_fill_(~finite, math.nan)
    noise = None
    if rounding == "stochastic":
        noise = to_blocks(uniform_noise(x, generator=generator, seed=seed), layout)
    r, q = round_elements(v, fmt=_FP4, rounding=rounding, sign_of=xb, noise=noise)
    y = r.mul_(q).mul_((s_t * s_b).masked_fill_(~finite, math.nan))
    return from_blocks(y, layout).to(x.dtype)
