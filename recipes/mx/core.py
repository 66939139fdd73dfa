"""Building blocks of the MX quantizer: blocking, shared exponents, element rounding.

Everything here is a pure tensor function on float32 data; the rules they
implement are stated in ``recipes.mx.quantize``'s module docstring. The hot
element-wise path works in place on one float32 buffer plus one int32 buffer
(fresh large allocations cost more than an in-place pass on CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from recipes.mx.formats import E8M0_MAX_EXP, E8M0_MIN_EXP, ElemFormat

__all__ = [
    "BlockLayout",
    "block_amax",
    "block_layout",
    "block_scales",
    "from_blocks",
    "pow2",
    "round_elements",
    "shared_exponent",
    "to_blocks",
]

_EXP_MASK = 0x7F800000
_MANT_MASK = 0x007FFFFF
#: 0.5 - 2^-25, the largest float32 below 0.5: floor(a + _HALF_DOWN) is exact
#: round-half-away for every float32 a >= 0 below 2^22 (plain a + 0.5 rounds
#: a = 0.5 - 2^-25 up to 1.0 in float32).
_HALF_DOWN = 0.5 - 2.0**-25


@dataclass(frozen=True)
class BlockLayout:
    """How a tensor of ``shape`` is viewed as ``(pre, num_blocks, block_size, post)`` blocks."""

    shape: tuple[int, ...]
    axis: int
    block_size: int
    pre: int
    n: int
    post: int

    @property
    def num_blocks(self) -> int:
        return -(-self.n // self.block_size)

    @property
    def pad(self) -> int:
        return self.num_blocks * self.block_size - self.n

    @property
    def blocks_shape(self) -> tuple[int, int, int, int]:
        return (self.pre, self.num_blocks, self.block_size, self.post)

    @property
    def scale_shape(self) -> tuple[int, ...]:
        """Shape of one-value-per-block tensors: ``shape`` with ``axis`` replaced by num_blocks."""
        s = list(self.shape)
        s[self.axis] = self.num_blocks
        return tuple(s)


def block_layout(shape: tuple[int, ...] | torch.Size, *, block_size: int, axis: int) -> BlockLayout:
    """Validate ``block_size`` / ``axis`` against ``shape`` and describe the blocking."""
    shape = tuple(int(d) for d in shape)
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    ndim = len(shape)
    if ndim == 0 or not -ndim <= axis < ndim:
        raise ValueError(f"axis={axis} is out of range for a tensor of shape {list(shape)}")
    axis = axis % ndim
    pre, post = math.prod(shape[:axis]), math.prod(shape[axis + 1 :])
    return BlockLayout(shape, axis, block_size, pre, shape[axis], post)


def to_blocks(x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """View ``x`` as ``(pre, num_blocks, block_size, post)``, zero-padding the blocked axis at its end."""
    x3 = x.reshape(layout.pre, layout.n, layout.post)
    if layout.pad:
        x3 = F.pad(x3, (0, 0, 0, layout.pad))
    return x3.view(layout.blocks_shape)


def from_blocks(xb: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: drop the padding and restore ``layout.shape``."""
    x3 = xb.reshape(layout.pre, layout.num_blocks * layout.block_size, layout.post)
    if layout.pad:
        x3 = x3[:, : layout.n]
    return x3.reshape(layout.shape)


def block_amax(xb: torch.Tensor) -> torch.Tensor:
    """max|x| per block, shape ``(pre, num_blocks, 1, post)``; NaN if the block holds a NaN.

    Two reductions (max and min) instead of ``abs().amax()``: no full-size temporary.
    """
    hi = xb.amax(dim=2, keepdim=True)
    lo = xb.amin(dim=2, keepdim=True)
    return torch.maximum(hi, lo.neg_())


def pow2(e: torch.Tensor) -> torch.Tensor:
    """Exact float32 ``2^e`` for int32 ``e`` in [-149, 127], built from bits (subnormals included)."""
    normal = (e + 127).clamp_(min=0) << 23
    subnormal = torch.ones_like(e) << (e + 149).clamp_(0, 22)
    return torch.where(e >= -126, normal, subnormal).view(torch.float32)


def _floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2 a) from the exponent bits of float32 ``a >= 0``; -127 for zero and subnormals."""
    return ((a.view(torch.int32) >> 23) & 0xFF) - 127


def _ceil_log2(a: torch.Tensor) -> torch.Tensor:
    """Exact ceil(log2 a) of finite float32 ``a >= 0``, floored at -127 (zero gives -127)."""
    bits = a.view(torch.int32)
    field = (bits >> 23) & 0xFF
    normal = field - 127 + ((bits & _MANT_MASK) != 0).to(torch.int32)
    subnormal = torch.where(bits > 0x00400000, -126, -127).to(torch.int32)  # 0x00400000 = 2^-127
    return torch.where(field == 0, subnormal, normal)


def _even_log2(a: torch.Tensor, mbits: int) -> torch.Tensor:
    """torchao EVEN: floor(log2) of ``a`` after rounding its mantissa to ``mbits`` bits (half up)."""
    bits = a.view(torch.int32) + (1 << (22 - mbits))
    return ((bits >> 23) & 0xFF) - 127


def shared_exponent(
    amax: torch.Tensor, *, fmt: ElemFormat, scale_rule: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block scale exponent ``se`` (int32, X = 2^se) and the NaN-block mask.

    ``se`` is clamped below at -127; it is 0 where the mask is set (NaN/Inf in
    the block, or an exponent above 127, i.e. not representable in E8M0).
    """
    finite = torch.isfinite(amax)
    a = torch.where(finite, amax, 0.0)
    if scale_rule == "floor":
        se = _floor_log2(a) - fmt.emax
    elif scale_rule == "ceil":
        se = _ceil_log2(a) - fmt.emax
    elif scale_rule == "even":
        se = _even_log2(a, fmt.mbits) - fmt.emax
    elif scale_rule == "rceil":
        # NVIDIA/cuBLAS: ceil(log2(amax / max_norm)) of the float32 quotient,
        # saturated to the E8M0 range (cvt.rp.satfinite.ue8m0).
        se = _ceil_log2(a / fmt.max_norm).clamp_(max=E8M0_MAX_EXP)
    else:  # validated by the caller
        raise AssertionError(scale_rule)
    se = se.clamp_(min=E8M0_MIN_EXP)
    nan = ~finite | (se > E8M0_MAX_EXP)
    return se.masked_fill_(nan, 0), nan


def block_scales(se: torch.Tensor, nan: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, 1/X)`` as exact float32 powers of two, NaN in NaN blocks."""
    scale = pow2(se).masked_fill(nan, math.nan)
    inv = pow2(-se).masked_fill(nan, math.nan)
    return scale, inv


def round_elements(
    v: torch.Tensor,
    *,
    fmt: ElemFormat,
    rounding: str,
    sign_of: torch.Tensor,
    noise: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """Round scaled elements ``v`` (float32, **overwritten**) onto ``fmt``'s grid.

    Returns ``(r, q)``: ``r`` integer-valued float32 (in place of ``v``) and the
    quantum ``q`` (per-element tensor, or a float for int8) with the element
    value ``w = r * q`` exactly, ``|w| <= max_norm`` (saturating). ``sign_of``
    supplies the sign for modes that round the magnitude (same sign as ``v``).
    ``noise``: U[0,1) float32 of ``v``'s shape, only for ``stochastic``.
    """
    v.clamp_(-fmt.max_norm, fmt.max_norm)  # saturate; rounding is monotone and max_norm is on the grid
    if fmt.is_int:
        q: torch.Tensor | float = 2.0**-fmt.mbits
        t = v.mul_(2.0**fmt.mbits)
    else:
        # quantum 2^(max(floor(log2|v|), emin) - mbits) from the exponent bits of v
        qbits = torch.bitwise_and(v.view(torch.int32), _EXP_MASK)
        qbits.clamp_(min=(fmt.emin + 127) << 23).sub_(fmt.mbits << 23)
        q = qbits.view(torch.float32)
        t = v.div_(q)  # exact: divides by a power of two, |t| < 2^(mbits+1)
    return _round_integer(t, rounding=rounding, sign_of=sign_of, noise=noise), q


def _round_integer(
    t: torch.Tensor, *, rounding: str, sign_of: torch.Tensor, noise: torch.Tensor | None
) -> torch.Tensor:
    """Round float32 ``t`` (|t| < 2^22) to an integer in place; the sign of zero follows ``t``."""
    if rounding == "nearest_even":
        return t.round_()  # round-half-to-even, keeps -0
    if rounding == "toward_zero":
        return t.abs_().floor_().copysign_(sign_of)  # torch.trunc is much slower on CPU
    if rounding == "nearest_away":
        return t.abs_().add_(_HALF_DOWN).floor_().copysign_(sign_of)
    if rounding == "stochastic":
        assert noise is not None
        a = t.abs_()
        r = torch.floor(a)
        frac = a.sub_(r)  # exact
        up = noise.lt_(frac)  # P(up) = frac (to 2^-24, the grid of torch.rand)
        return r.add_(up).copysign_(sign_of)
    raise AssertionError(rounding)
