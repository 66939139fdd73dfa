"""Exact MX encoding: element bit codes + E8M0 scale bytes, and decoding back.

Numerics: ``encode_mx`` runs exactly the quantizer of ``quantize_mx`` (same
scale rule, rounding, saturation; see ``recipes.mx.quantize``) and stores

* ``codes``: uint8, one per element, ``x``'s shape. The element's bit pattern
  in the low ``fmt.bits`` bits, sign in bit ``fmt.bits - 1``:
  float formats ``sign | exponent (biased by 2^(ebits-1)-1) | mantissa``
  (fp8 codes are the ``torch.float8_e4m3fn`` / ``float8_e5m2`` bit patterns),
  int8 the two's-complement byte of ``round(v * 64)`` (never 0x80 = -2.0).
* ``scales_e8m0``: uint8, one per block, ``x``'s shape with the blocked axis
  replaced by the number of blocks: ``se + 127``; 0xFF marks a NaN block,
  whose element codes are 0.

``decode_mx(encode_mx(x))`` is bitwise ``quantize_mx(x).float()``, with one
exception: MXINT8 has no negative zero, so an int8 element that rounded to
-0.0 in ``quantize_mx`` decodes as +0.0 (the float formats keep -0.0 in the
sign bit).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from recipes.mx.core import block_layout, from_blocks, pow2, to_blocks
from recipes.mx.formats import E8M0_BIAS, E8M0_NAN, ElemFormat, get_format
from recipes.mx.quantize import prepare, quantize_blocks

__all__ = ["MXTensor", "decode_mx", "element_values", "encode_mx"]


@dataclass(frozen=True)
class MXTensor:
    """An MX-encoded tensor: element codes, E8M0 block scales and the blocking that produced them."""

    #: uint8 element codes, ``shape``
    codes: torch.Tensor
    #: uint8 E8M0 scale bytes (0xFF = NaN), ``shape`` with ``axis`` -> number of blocks
    scales_e8m0: torch.Tensor
    fmt: ElemFormat
    block_size: int
    #: non-negative axis the blocks run along
    axis: int
    shape: tuple[int, ...]
    #: dtype of the tensor that was encoded (``decode_mx`` returns float32)
    dtype: torch.dtype = torch.float32

    @property
    def num_blocks(self) -> int:
        return int(self.scales_e8m0.shape[self.axis])


def _float_value(fmt: ElemFormat, code: int) -> float:
    """Value of one float-format code (OFP8 specials for the fp8 formats)."""
    sign = -1.0 if code & fmt.sign_bit else 1.0
    e = (code >> fmt.mbits) & ((1 << fmt.ebits) - 1)
    m = code & ((1 << fmt.mbits) - 1)
    if fmt.name == "fp8_e4m3" and e == 15 and m == 7:
        return math.nan
    if fmt.name == "fp8_e5m2" and e == 31:
        return math.nan if m else sign * math.inf
    if e == 0:
        return sign * m * 2.0 ** (fmt.emin - fmt.mbits)
    return sign * (1 + m / 2**fmt.mbits) * 2.0 ** (e - fmt.bias)


@functools.cache
def _value_table(fmt: ElemFormat) -> tuple[float, ...]:
    if fmt.is_int:
        return tuple((c - 256 if c >= 128 else c) / 64.0 for c in range(256))
    return tuple(_float_value(fmt, c) for c in range(1 << fmt.bits))


def element_values(fmt: str | ElemFormat, *, device: torch.device | str | None = None) -> torch.Tensor:
    """float32 value of every code of ``fmt`` (index = code), built from the format's fields."""
    return torch.tensor(_value_table(get_format(fmt)), dtype=torch.float32, device=device)


def _codes_from_values(w: torch.Tensor, fmt: ElemFormat) -> torch.Tensor:
    """uint8 codes of element values ``w`` (float32, exactly on ``fmt``'s grid, |w| <= max_norm)."""
    if fmt.is_int:
        return (w * 2.0**fmt.mbits).to(torch.int32).to(torch.uint8)  # two's complement byte
    bits = w.view(torch.int32)
    mag = w.abs()
    # normal: re-bias the float32 exponent and keep the top mbits of the mantissa
    normal = (mag.view(torch.int32) >> (23 - fmt.mbits)) - ((127 - fmt.bias) << fmt.mbits)
    subnormal = (mag * 2.0 ** (fmt.mbits - fmt.emin)).to(torch.int32)  # exact multiple of the quantum
    code = torch.where(mag >= fmt.min_normal, normal, subnormal)
    code |= (bits < 0).to(torch.int32) << (fmt.bits - 1)
    return code.to(torch.uint8)


def encode_mx(
    x: torch.Tensor,
    fmt: str | ElemFormat,
    *,
    block_size: int = 32,
    axis: int = -1,
    rounding: str = "nearest_even",
    scale_rule: str = "floor",
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> MXTensor:
    """Quantize ``x`` exactly as ``quantize_mx`` does and return the codes and E8M0 scales."""
    fmt, layout, noise = prepare(
        x,
        fmt,
        block_size=block_size,
        axis=axis,
        rounding=rounding,
        scale_rule=scale_rule,
        generator=generator,
        seed=seed,
    )
    xb = to_blocks(x.float(), layout)
    nb = None if noise is None else to_blocks(noise, layout)
    m = quantize_blocks(xb, nb, fmt=fmt, rounding=rounding, scale_rule=scale_rule)
    w = m.r.mul_(m.q)
    codes = _codes_from_values(w, fmt).masked_fill_(m.nan, 0)
    scales = (m.se + E8M0_BIAS).masked_fill_(m.nan, E8M0_NAN).to(torch.uint8)
    return MXTensor(
        codes=from_blocks(codes, layout),
        scales_e8m0=scales.reshape(layout.scale_shape),
        fmt=fmt,
        block_size=block_size,
        axis=layout.axis,
        shape=layout.shape,
        dtype=x.dtype,
    )


def decode_mx(mx: MXTensor) -> torch.Tensor:
    """float32 values of an ``MXTensor``: ``element_value(code) * 2^(scale - 127)``, NaN for scale 0xFF."""
    layout = block_layout(mx.shape, block_size=mx.block_size, axis=mx.axis)
    table = element_values(mx.fmt, device=mx.codes.device)
    w = to_blocks(table[mx.codes.long()], layout)
    s = mx.scales_e8m0.reshape(layout.pre, layout.num_blocks, 1, layout.post)
    scale = pow2(s.to(torch.int32) - E8M0_BIAS).masked_fill_(s == E8M0_NAN, math.nan)
    return from_blocks(w * scale, layout)
