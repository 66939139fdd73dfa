"""Slow, step-by-step MX reference quantizer (for tests and benchmarks, not for training).

It follows microxcaling's pure-PyTorch algorithm (``mx/mx_ops.py::_quantize_mx``
and ``mx/elemwise_ops.py::_quantize_elemwise_core``) one operation at a time,
with per-element ``log2`` and ``2**e``:

    amax  = max|x| per block                  (NaN propagates)
    e     = floor(log2(amax))                 shared exponent
    se    = e - emax; NaN if > 127; -127 if below
    v     = x / 2**se
    pe    = max(floor(log2|v|), emin)         per-element exponent (int8: fixed quantum)
    t     = v / 2**pe * 2**mbits              position in quanta
    r     = round(t)                          floor(|t| + 0.5) style formulas
    out   = clamp(r / 2**mbits * 2**pe, +-max_norm) * 2**se

Two modes:

* ``microxcaling=False`` (default): every step in float64, where each of them
  is exact, with ``rounding`` and ``scale_rule`` as ``recipes.mx.quantize``
  defines them (the -0 sign kept with ``copysign``). This is the independent
  definition lowbit's fast quantizer must match bit for bit.
* ``microxcaling=True``: the same steps in float32 with microxcaling's exact
  formulas (``torch.log2`` in float32, ``sign(t) * floor(|t| + 0.5)``, its
  even-tie mask, ``FP32_MIN_NORMAL`` for all-zero blocks), reproducing its
  quirks (a) log2 rounding near powers of two, (b) 0.49999997, (c) -0 -> +0.
  Only ``scale_rule="floor"`` and the three deterministic roundings exist there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from recipes.mx.formats import ElemFormat, check_rounding, check_scale_rule, get_format

__all__ = ["quantize_mx_reference"]

_MX_ROUND = {"nearest_away": "nearest", "nearest_even": "even", "toward_zero": "floor"}


def _to_blocks(x: torch.Tensor, block_size: int, axis: int) -> tuple[torch.Tensor, int]:
    a = x.movedim(axis, -1)
    n = a.shape[-1]
    a = F.pad(a, (0, -n % block_size))
    return a.reshape(*a.shape[:-1], -1, block_size), n


def _from_blocks(b: torch.Tensor, n: int, axis: int) -> torch.Tensor:
    a = b.reshape(*b.shape[:-2], -1)[..., :n]
    return a.movedim(-1, axis)


def _exact_block_exponent(amax32: torch.Tensor, fmt: ElemFormat, scale_rule: str) -> torch.Tensor:
    """Unclamped scale exponent (float64) by the lowbit definitions, -inf for amax 0."""
    a = amax32.double()
    if scale_rule == "floor":
        return torch.floor(torch.log2(a)) - fmt.emax
    if scale_rule == "ceil":
        return torch.ceil(torch.log2(a)) - fmt.emax
    if scale_rule == "rceil":
        quotient = (amax32 / fmt.max_norm).double()  # the float32 division, as cuBLAS/torchao
        return torch.ceil(torch.log2(quotient))
    # even: floor(log2) after rounding amax's mantissa to mbits bits, half up, on the fp32 bits
    e = torch.floor(torch.log2(a))
    normal = e + (a / torch.exp2(e) >= 2 - 2.0 ** -(fmt.mbits + 1)).double()
    tiny = 2.0**-126
    subnormal = torch.where(a >= tiny * (1 - 2.0 ** -(fmt.mbits + 1)), -126.0, -127.0).double()
    return torch.where(a >= tiny, normal, torch.where(a > 0, subnormal, e)) - fmt.emax


def _round(t: torch.Tensor, rounding: str, microxcaling: bool) -> torch.Tensor:
    """microxcaling's ``_round_mantissa`` formulas (exact in float64)."""
    a = torch.abs(t)
    if rounding == "nearest_away":
        r = torch.floor(a + 0.5)
    elif rounding == "nearest_even":
        tie_mask = ((a - 0.5) % 2 == torch.zeros_like(a)).to(a.dtype)  # 0.5, 2.5, 4.5, ...
        r = torch.floor(a + 0.5) - tie_mask
    else:
        r = torch.floor(a)
    return torch.sign(t) * r if microxcaling else torch.copysign(r, t)


def quantize_mx_reference(
    x: torch.Tensor,
    elem_format: str | ElemFormat,
    *,
    block_size: int = 32,
    axis: int = -1,
    rounding: str = "nearest_even",
    scale_rule: str = "floor",
    microxcaling: bool = False,
) -> torch.Tensor:
    """Reference MX fake quantization, float32 result (module docstring)."""
    fmt = get_format(elem_format)
    if check_rounding(rounding) == "stochastic":
        raise ValueError("the reference quantizer has no stochastic rounding")
    check_scale_rule(scale_rule)
    if microxcaling and scale_rule != "floor":
        raise ValueError("microxcaling only has scale_rule='floor'")
    dt = torch.float32 if microxcaling else torch.float64
    blocks, n = _to_blocks(x.float(), block_size, axis)
    amax = torch.max(torch.abs(blocks), dim=-1, keepdim=True).values

    if microxcaling:
        se = torch.floor(torch.log2(amax + 2.0**-126 * (amax == 0).to(amax.dtype))) - fmt.emax
        se[se > 127] = math.nan
    else:
        se = _exact_block_exponent(amax, fmt, scale_rule)
        se = se.clamp(max=127) if scale_rule == "rceil" else se.masked_fill(se > 127, math.nan)
        se = se.masked_fill(~torch.isfinite(amax), math.nan)
    se[se < -127] = -127

    v = blocks.to(dt) / (2**se)
    if fmt.is_int:
        t = v * 2**fmt.mbits
        r = _round(t, rounding, microxcaling)
        w = torch.clamp(r / 2**fmt.mbits, min=-fmt.max_norm, max=fmt.max_norm)
    else:
        pe = torch.floor(torch.log2(torch.abs(v) + (v == 0).to(dt))).clip(min=fmt.emin)
        t = v / (2**pe) * (2**fmt.mbits)
        r = _round(t, rounding, microxcaling)
        w = torch.clamp(r / (2**fmt.mbits) * (2**pe), min=-fmt.max_norm, max=fmt.max_norm)
    out = (w * (2**se)).float()
    return _from_blocks(out, n, axis if axis >= 0 else x.dim() + axis).to(x.dtype)
