"""Sub-tensor FP8 scaling: rowwise (torchao ``rowwise``) and TE ``Float8BlockScaling`` blocks.

Numerics
--------
Every block gets its own FP32 scale from its own amax (NaN-ignoring max|x|),
computed by :func:`recipes.fp8.scaling.scale_from_amax`; elements are then
quantized exactly as in :func:`recipes.fp8.formats.quantize_fp8`
(``cast_fp8(clamp(x*scale))``, RNE, saturating, NaN propagates) and dequantize
as ``q/scale``.

* **Rowwise** (:func:`quantize_fp8_rowwise`): one scale per slice along
  ``axis`` (the GEMM's reduction dim; for ``x @ W.T`` with ``x:[M,K]`` and
  ``W:[N,K]``, ``axis=-1`` gives one scale per token row of ``x`` and per
  output row of ``W``). torchao's ``Float8LinearConfig.from_recipe_name("rowwise")``:
  ``scale = fp8_max / max(amax, 1e-12)``, rounded down to a power of two
  (``round_scales_to_power_of_2=True`` in that recipe). lowbit follows its layout and amax floor
  but rounds to a power of two by TE's bit mask, where torchao's FP32 ``exp2(floor(log2 s))``
  gives 2^k for a scale just below it (amax 0.43750003: torchao 1024, lowbit 512), and treats a
  NaN/Inf row as lowbit's FP8 amax does (NaN ignored; torchao's row goes NaN). Compared with
  torchao by FP8 codes (> 99.9 % equal, ``tests/test_parity.py``), not bit for bit.
* **Block 1x128** (:func:`quantize_fp8_block_1d`): TE's activation and gradient
  tiles, 128 consecutive elements along ``axis`` share a scale. TE makes the
  rowwise copy with blocks along the last dim and the columnwise (transposed)
  copy with 128x1 blocks along the first (flattened) dim; pass ``axis``
  accordingly (the reduction dim of the GEMM that consumes the copy).
* **Block 128x128** (:func:`quantize_fp8_block_2d`): TE's weight tiles over the
  last two dims; the same scale serves the rowwise and the transposed copy.
* Block scales follow TE's ``compute_scale_from_amax``: ``amax < eps -> eps``;
  amax 0/Inf/NaN -> scale 1.0; FP32 overflow -> the input dtype's max;
  **power-of-2 by default** (TE; ``NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1``
  relaxes it, here ``power_2_scales=False``). Elements are E4M3 by default.
* A dim that is not a multiple of the block size is zero-padded for the amax
  (padding cannot raise a block's amax) and sliced off afterwards.

``for_gemm=True`` returns the same values in BF16 where they are all exact there (power-of-two
scales only, :func:`exact_in_bf16`), for the emulated backend's BF16 GEMMs (``recipes.qlinear``).

What stays high precision: the scales (FP32), and every tensor the caller
does not pass in. Differences from TE: TE stores ``scale_inv = 1/scale`` and
multiplies; identical for power-of-2 scales, may differ by 1 FP32 ulp for FP32
scales (``cast_to_fp8_block*`` return TE's ``scale_inv``). TE's cuBLAS block
GEMM additionally forces split (FP32) accumulation; the GEMM is not emulated here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from recipes.fp8.formats import E4M3, FP8Format, amax, format_for_role, get_format
from recipes.fp8.scaling import scale_from_amax
from recipes.mx.quantize import BF16_MIN_EXP

__all__ = [
    "Float8BlockScaling",
    "cast_to_fp8_block_1d",
    "cast_to_fp8_block_2d",
    "cast_to_fp8_rowwise",
    "quantize_fp8_block_1d",
    "quantize_fp8_block_2d",
    "quantize_fp8_rowwise",
]

TORCHAO_AMAX_EPS = 1e-12  # torchao.float8.float8_utils.EPS


def _blocked_cast(
    x: torch.Tensor,
    fmt: FP8Format,
    blocks: dict[int, int],
    *,
    power_2_scales: bool,
    amax_epsilon: float,
    value_for_inf: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tile ``x`` with ``blocks`` ({axis: size}), one scale per tile.

    Returns ``(q, scale, scale_inv)``: ``q`` is float8 with ``x``'s shape;
    ``scale`` and ``scale_inv`` are per tile, shaped like ``x`` with each
    blocked axis replaced by its number of tiles (see :func:`_expand`).
    """
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {x.dtype}")
    nd = x.dim()
    blocks = {a % nd: b for a, b in blocks.items()}
    pad: list[int] = []
    for d in reversed(range(nd)):  # F.pad takes (last_lo, last_hi, prev_lo, prev_hi, ...)
        n = x.shape[d]
        pad += [0, (-n) % blocks[d] if d in blocks else 0]
    xp = F.pad(x, pad) if any(pad) else x
    tiled_shape: list[int] = []
    inner_dims: list[int] = []
    for d in range(nd):
        n = xp.shape[d]
        if d in blocks:
            tiled_shape += [n // blocks[d], blocks[d]]
            inner_dims.append(len(tiled_shape) - 1)
        else:
            tiled_shape.append(n)
    xt = xp.reshape(tiled_shape)
    a = amax(xt, dim=tuple(inner_dims), keepdim=True)
    scale = scale_from_amax(
        a, fmt.max, power_2_scale=power_2_scales, amax_epsilon=amax_epsilon, value_for_inf=value_for_inf
    )
    q = (xt.float() * scale).clamp(-fmt.max, fmt.max).to(fmt.dtype)
    q = q.reshape(xp.shape)[tuple(slice(0, n) for n in x.shape)]
    scale = scale.squeeze(inner_dims)
    return q, scale, torch.reciprocal(scale)


def _expand(scale: torch.Tensor, blocks: dict[int, int], shape: Sequence[int]) -> torch.Tensor:
    """Per-tile scales -> per-element scales of ``shape`` (repeat each tile, crop padding)."""
    nd = len(shape)
    s = scale
    for d, b in blocks.items():
        s = s.repeat_interleave(b, dim=d % nd)
    return s[tuple(slice(0, n) for n in shape)]


def _quantize_blocked(x, fmt, blocks, *, power_2_scales, amax_epsilon, value_for_inf, for_gemm=False):
    q, scale, _ = _blocked_cast(
        x, fmt, blocks, power_2_scales=power_2_scales, amax_epsilon=amax_epsilon, value_for_inf=value_for_inf
    )
    y = q.float() / _expand(scale, blocks, x.shape)
    if for_gemm and power_2_scales and exact_in_bf16(scale, fmt):
        return y.to(torch.bfloat16)
    return y.to(x.dtype)


def exact_in_bf16(scale: torch.Tensor, fmt: FP8Format) -> bool:
    """Whether ``code / scale`` is exact in BF16 for every element, given power-of-two ``scale``s.

    An FP8 code has at most 4 significant bits and a quantum >= ``fmt.min_subnormal``; divided by
    ``2^k`` its quantum is >= ``min_subnormal * 2^-k_max``, so every value is a BF16 value unless
    that falls below 2^-133 (a block with amax below ~2^-115). Zero and NaN blocks have scale 1.
    One reduction over the scales, none over the elements.
    """
    k_max = int(torch.frexp(scale.amax())[1]) - 1  # scale = 2^k: frexp gives (0.5, k + 1)
    return math.log2(fmt.min_subnormal) - k_max >= BF16_MIN_EXP


def _dtype_max(x: torch.Tensor) -> float:
    """TE's ``value_for_inf`` for block scaling: the *input* dtype's largest finite value."""
    return float(torch.finfo(x.dtype).max)


def _rowwise_blocks(x: torch.Tensor, axis: int) -> dict[int, int]:
    return {axis % x.dim(): max(x.shape[axis], 1)}


def cast_to_fp8_rowwise(
    x: torch.Tensor,
    fmt: str | FP8Format = E4M3,
    *,
    axis: int = -1,
    power_2_scales: bool = True,
    amax_epsilon: float = TORCHAO_AMAX_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rowwise cast: ``(q, scale_inv)`` with ``scale_inv`` of ``x.shape`` but size 1 along ``axis``."""
    blocks = _rowwise_blocks(x, axis)
    q, _, scale_inv = _blocked_cast(
        x,
        get_format(fmt),
        blocks,
        power_2_scales=power_2_scales,
        amax_epsilon=amax_epsilon,
        value_for_inf=float(torch.finfo(torch.float32).max),
    )
    return q, scale_inv


def quantize_fp8_rowwise(
    x: torch.Tensor,
    fmt: str | FP8Format = E4M3,
    *,
    axis: int = -1,
    power_2_scales: bool = True,
    amax_epsilon: float = TORCHAO_AMAX_EPS,
    for_gemm: bool = False,
) -> torch.Tensor:
    """Quantize-dequantize with one scale per slice along ``axis`` (amax reduced over ``axis``).

    Defaults follow torchao's ``rowwise`` recipe (power-of-2 scales, amax floor 1e-12).
    ``for_gemm``: return BF16 where every value is exact there (:func:`exact_in_bf16`).
    """
    return _quantize_blocked(
        x,
        get_format(fmt),
        _rowwise_blocks(x, axis),
        power_2_scales=power_2_scales,
        amax_epsilon=amax_epsilon,
        value_for_inf=float(torch.finfo(torch.float32).max),
        for_gemm=for_gemm,
    )


def cast_to_fp8_block_1d(
    x: torch.Tensor,
    fmt: str | FP8Format = E4M3,
    *,
    axis: int = -1,
    block_size: int = 128,
    power_2_scales: bool = True,
    amax_epsilon: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """1 x ``block_size`` cast: ``(q, scale_inv)``, ``scale_inv`` with ``ceil(n/block_size)`` along ``axis``."""
    q, _, scale_inv = _blocked_cast(
        x,
        get_format(fmt),
        {axis: block_size},
        power_2_scales=power_2_scales,
        amax_epsilon=amax_epsilon,
        value_for_inf=_dtype_max(x),
    )
    return q, scale_inv


def quantize_fp8_block_1d(
    x: torch.Tensor,
    fmt: str | FP8Format = E4M3,
    *,
    axis: int = -1,
    block_size: int = 128,
    power_2_scales: bool = True,
    amax_epsilon: float = 0.0,
    for_gemm: bool = False,
) -> torch.Tensor:
    """Quantize-dequantize with 1 x ``block_size`` tiles along ``axis`` (TE 1x128: activations, grads)."""
    return _quantize_blocked(
        x,
        get_format(fmt),
        {axis: block_size},
        power_2_scales=power_2_scales,
        amax_epsilon=amax_epsilon,
        value_for_inf=_dtype_max(x),
        for_gemm=for_gemm,
    )


def _blocks_2d(x: torch.Tensor, block_size: int) -> dict[int, int]:
    if x.dim() < 2:
        raise ValueError(f"2D block scaling needs a tensor with >= 2 dims, got shape {tuple(x.shape)}")
    return {x.dim() - 2: block_size, x.dim() - 1: block_size}


def cast_to_fp8_block_2d(
    x: torch.Tensor,
    fmt: str | FP8Format = E4M3,
    *,
    block_size: int = 128,
    power_2_scales: bool = True,
    amax_epsilon: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``block_size`` x ``block_size`` cast over the last two dims: ``(q, scale_inv[..., tiles_m, tiles_k])``."""
    q, _, scale_inv = _blocked_cast(
        x,
        get_format(fmt),
        _blocks_2d(x, block_size),
        power_2_scales=power_2_scales,
        amax_epsilon=amax_epsilon,
        value_for_inf=_dtype_max(x),
    )
    return q, scale_inv


def quantize_fp8_block_2d(
    x: torch.Tensor,
    fmt: str | FP8Format = E4M3,
    *,
    block_size: int = 128,
    power_2_scales: bool = True,
    amax_epsilon: float = 0.0,
    for_gemm: bool = False,
) -> torch.Tensor:
    """Quantize-dequantize with square tiles over the last two dims (TE 128x128: weights)."""
    return _quantize_blocked(
        x,
        get_format(fmt),
        _blocks_2d(x, block_size),
        power_2_scales=power_2_scales,
        amax_epsilon=amax_epsilon,
        value_for_inf=_dtype_max(x),
        for_gemm=for_gemm,
    )


@dataclass(frozen=True)
class Float8BlockScaling:
    """Config twin of TE's ``Float8BlockScaling`` ("DeepSeek-V3 style" blocks)."""

    fp8_format: str = "E4M3"
    """Element format for all roles (TE default E4M3; ``"HYBRID"`` puts grads in E5M2)."""
    x_block_scaling_dim: int = 1
    """1: 1x128 tiles for activations; 2: 128x128."""
    w_block_scaling_dim: int = 2
    """2: 128x128 tiles for weights; 1: 1x128."""
    grad_block_scaling_dim: int = 1
    power_2_scales: bool = True
    """TE's default; ``NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1`` in TE corresponds to False."""
    amax_epsilon: float = 0.0
    block_size: int = 128

    def __post_init__(self) -> None:
        for key in ("x_block_scaling_dim", "w_block_scaling_dim", "grad_block_scaling_dim"):
            if getattr(self, key) not in (1, 2):
                raise ValueError(f"{key}={getattr(self, key)} must be 1 (1x128) or 2 (128x128)")
        if self.fp8_format.upper() not in ("E4M3", "HYBRID"):
            raise ValueError(f"fp8_format={self.fp8_format!r}: use 'E4M3' or 'HYBRID'")
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size} must be >= 1")

    def block_dim_for(self, role: str) -> int:
        if role == "weight":
            return self.w_block_scaling_dim
        if role.startswith("grad"):
            return self.grad_block_scaling_dim
        return self.x_block_scaling_dim

    def quantize(self, x: torch.Tensor, role: str, *, axis: int = -1) -> torch.Tensor:
        """Quantize-dequantize ``x`` playing ``role``; ``axis`` is the tile axis for 1D tiles."""
        fmt = format_for_role(self.fp8_format, role)
        b, p2, eps = self.block_size, self.power_2_scales, self.amax_epsilon
        if self.block_dim_for(role) == 2:
            return quantize_fp8_block_2d(x, fmt, block_size=b, power_2_scales=p2, amax_epsilon=eps)
        return quantize_fp8_block_1d(x, fmt, axis=axis, block_size=b, power_2_scales=p2, amax_epsilon=eps)
