"""MX (OCP Microscaling v1.0) fake quantization: ``quantize_mx``.

Numerics
--------
What is quantized: any float32 / bfloat16 / float16 tensor ``x``, in blocks of
``block_size`` consecutive elements along one ``axis`` (default: 32 along the
last axis). The result is ``dequantize(quantize(x))``: a tensor of ``x``'s
shape and dtype holding exactly the values an MX tensor with that element
format and E8M0 block scales represents. All arithmetic is float32 (bf16/fp16
inputs are upcast and the result cast back, which is exact except in the
subnormal range of that dtype). The last block of an axis that is not a multiple of
``block_size`` is zero-padded (padding never raises a block's amax).

Per block, with ``amax = max|x|`` over the block and the element format's
``emax`` / ``max_norm`` (table in ``recipes.mx.formats``):

1. **Shared exponent** ``se``, block scale ``X = 2^se`` (``scale_rule``):

   * ``"floor"`` (OCP spec §6.3, microxcaling, torchao FLOOR):
     ``se = floor(log2 amax) - emax``, with ``floor(log2 amax)`` read
     *exactly* from the float32 exponent bits (zero and fp32-subnormal amax
     count as -127, which the clamp below makes irrelevant).
   * ``"ceil"`` (torchao CEIL): ``se = ceil(log2 amax) - emax``, exact.
     torchao adds one to the exponent field when the mantissa is non-zero;
     the pre-clamp exponents differ only for amax <= 2^-127; after the clamp
     the scales are identical.
   * ``"rceil"`` (torchao RCEIL = NVIDIA cuBLAS / MXFP8 "round-up" rule):
     ``se = ceil(log2(fp32(amax / max_norm)))`` of the float32 quotient
     (exact ceil of that value, as ``cvt.rp.satfinite.ue8m0`` is documented
     to compute it: unverified here, it is a Blackwell instruction),
     saturated to [-127, 127] (never a NaN scale for finite data). So
     ``amax / X <= max_norm``: nothing saturates, small values may lose bits.
   * ``"even"`` (torchao EVEN): ``"floor"`` applied to amax after rounding
     its mantissa to the element's ``mbits`` bits, half up, on the float32
     bits (``(bits + 2^(22-mbits)) & ~0x7FFFFF``): the scale steps up one
     binade when amax would round to the next power of two.

   Then ``se`` is clamped below at -127 (E8M0's smallest, X = 2^-127); a
   block with ``se > 127`` (only possible for int8 with ``"ceil"``/``"even"``
   near FLT_MAX), or with any NaN or +-Inf, gets the E8M0 NaN scale and
   **dequantizes to all NaN** (as microxcaling; Inf is never preserved).

2. **Elements** ``v = x / X`` (exact: X is a power of two) are rounded to the
   element grid: for float formats the quantum is
   ``2^(max(floor(log2|v|), emin) - mbits)`` (subnormals kept, no flush),
   for int8 the fixed ``2^-6``. ``rounding``:

   * ``"nearest_even"``: round to nearest, ties to even (the spec's RNE;
     torchao's casts; microxcaling ``round="even"``);
   * ``"nearest_away"``: round to nearest, ties away from zero (microxcaling's
     default ``round="nearest"``);
   * ``"toward_zero"``: truncate the magnitude (microxcaling ``"floor"``);
   * ``"stochastic"``: round the magnitude up with probability equal to its
     distance from the lower neighbour (to within 2^-24, the resolution of
     ``torch.rand``); only the two neighbouring grid values occur.
     Deterministic for a given ``generator`` state or ``seed``; the random
     numbers are drawn as one ``torch.rand(x.shape)``.

   Saturation: values beyond the largest element clamp to ``+-max_norm``
   (never Inf, also for fp8_e5m2). int8 is symmetric: -2.0 is never produced.
   The sign of zero is kept (a negative value that rounds to zero gives -0).

3. Output ``w * X`` (exact in float32 for every format and scale).

Deliberate differences from the references (each tested in tests/test_mx_*):

(a) microxcaling takes ``floor(log2 amax)`` with float32 ``torch.log2``, which
    rounds up to the next integer within a few ulp below a power of two
    (e.g. ``amax = 64*(1-2^-24)`` gives 6, not 5): one binade too large a
    scale, and at ``amax = FLT_MAX`` +Inf (fp8_e4m3) or an all-NaN block
    (int8). lowbit reads the exponent bits: always the exact floor.
(b) microxcaling rounds ``nearest`` / ``even`` as ``floor(|t| + 0.5)`` in
    float32, so ``t = 0.5 - 2^-25`` (0.49999997 quanta) rounds up to one
    quantum. lowbit rounds exactly (that value goes to 0).
(c) microxcaling maps an input -0.0 to +0.0 (``sign(-0) = 0``); lowbit keeps
    -0.0. (Both give -0.0 for a negative value that rounds to zero.)
(d) torchao (FLOOR/CEIL/EVEN) divides by ``max(X, 2^-126)`` when quantizing but
    multiplies by ``X = 2^-127`` when dequantizing, halving every value of a
    block whose scale is 2^-127; its RCEIL path scales such blocks by 1.0.
    lowbit uses X = 2^-127 consistently.
(e) torchao gives a block holding +-Inf a finite scale: the Inf survives
    (overflowing on dequantize) and the rest of the block underflows to 0.
    lowbit makes the whole block NaN, as for NaN.
(f) torchao's RCEIL (its eager / CPU path) takes ``ceil(torch.log2(d))`` in
    float32, which rounds ``log2(2^k (1 + 2^-23))`` to ``k`` for |k| >= 4
    (k >= 4 or k <= -5, the common small-amax range of E4M3 blocks):
    a scale one binade too small (that element saturates, small elements
    keep one more bit). lowbit takes the exact ceil of ``d``, as NVIDIA's
    ``cvt.rp.satfinite.ue8m0x2.f32`` is documented to (unverified here).

Otherwise lowbit matches microxcaling (``round="nearest"`` / ``"even"``)
bit for bit, and torchao's ``to_mx`` + dequantize for FLOOR / CEIL / RCEIL /
EVEN, on ordinary data (tests/test_mx_golden.py, tests/test_mx_torchao.py).

Encoding to element codes + E8M0 bytes is in ``recipes.mx.encode``; NVFP4 in
``recipes.mx.nvfp4``; a slow step-by-step reference in ``recipes.mx.reference``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from recipes import compiling
from recipes.mx.core import (
    BlockLayout,
    block_amax,
    block_layout,
    block_scales,
    from_blocks,
    round_elements,
    shared_exponent,
    to_blocks,
)
from recipes.mx.formats import ElemFormat, check_rounding, check_scale_rule, get_format

__all__ = [
    "BF16_MIN_EXP",
    "MXBlocks",
    "exact_in_bf16",
    "quantize_blocks",
    "quantize_mx",
    "quantize_mx_compiled",
    "uniform_noise",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class MXBlocks:
    """One blocked quantization result: element value ``r * q``, dequantized ``r * q * scale``.

    Shapes: ``r`` (and ``q`` unless it is int8's float quantum) are
    ``(pre, num_blocks, block_size, post)``; ``se``, ``nan``, ``scale`` are
    ``(pre, num_blocks, 1, post)``.
    """

    #: integer-valued float32 grid index (sign included)
    r: torch.Tensor
    #: quantum: per-element float32 power of two, or a float (int8)
    q: torch.Tensor | float
    #: int32 scale exponent, X = 2^se (0 in NaN blocks)
    se: torch.Tensor
    #: NaN-block mask (NaN/Inf in the block, or se > 127)
    nan: torch.Tensor
    #: float32 X = 2^se, NaN in NaN blocks
    scale: torch.Tensor
    #: float32 block amax (NaN in blocks holding a NaN)
    amax: torch.Tensor


def quantize_blocks(
    xb: torch.Tensor,
    noise_b: torch.Tensor | None,
    *,
    fmt: ElemFormat,
    rounding: str,
    scale_rule: str,
) -> MXBlocks:
    """Quantize float32 blocks ``(pre, num_blocks, block_size, post)``; the core of every MX path."""
    amax = block_amax(xb)
    se, nan = shared_exponent(amax, fmt=fmt, scale_rule=scale_rule)
    scale, inv = block_scales(se, nan)
    v = torch.mul(xb, inv)  # exact (power-of-two scale); NaN in NaN blocks
    r, q = round_elements(v, fmt=fmt, rounding=rounding, sign_of=xb, noise=noise_b)
    return MXBlocks(r, q, se, nan, scale, amax)


def _fake_quant_fp32(
    x32: torch.Tensor,
    noise: torch.Tensor | None,
    *,
    fmt: ElemFormat,
    layout: BlockLayout,
    rounding: str,
    scale_rule: str,
) -> torch.Tensor:
    """float32 in, float32 out: dequantize(quantize(x32)). Compiled as-is by ``compile=True``."""
    xb = to_blocks(x32, layout)
    nb = None if noise is None else to_blocks(noise, layout)
    m = quantize_blocks(xb, nb, fmt=fmt, rounding=rounding, scale_rule=scale_rule)
    return from_blocks(_dequantized(m), layout)


def _dequantized(m: MXBlocks) -> torch.Tensor:
    """``r * q * scale`` in place of ``m.r`` (blocked)."""
    if isinstance(m.q, float):
        return m.r.mul_(m.scale * m.q)  # int8: 2^(se-6) >= 2^-133 is exact
    return m.r.mul_(m.q).mul_(m.scale)


def uniform_noise(x: torch.Tensor, *, generator: torch.Generator | None, seed: int | None) -> torch.Tensor:
    """U[0,1) float32 noise of ``x``'s shape for stochastic rounding (``seed`` makes a fresh generator)."""
    if generator is not None and seed is not None:
        raise ValueError("pass either generator= or seed= for stochastic rounding, not both")
    if seed is not None:
        generator = torch.Generator(device=x.device).manual_seed(seed)
    return torch.rand(x.shape, generator=generator, dtype=torch.float32, device=x.device)


def check_input(x: torch.Tensor) -> None:
    """Raise a ValueError unless ``x`` is a float32 / bfloat16 / float16 tensor."""
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"MX quantization takes a float32/bfloat16/float16 tensor, got {got}")


def prepare(
    x: torch.Tensor,
    elem_format: str | ElemFormat,
    *,
    block_size: int,
    axis: int,
    rounding: str,
    scale_rule: str,
    generator: torch.Generator | None,
    seed: int | None,
) -> tuple[ElemFormat, Any, torch.Tensor | None]:
    """Checks and set-up shared by ``quantize_mx`` and ``encode_mx``: the format, the block
    layout, and the stochastic-rounding noise (None unless rounding is stochastic)."""
    fmt = get_format(elem_format)
    check_input(x)
    check_rounding(rounding)
    check_scale_rule(scale_rule)
    layout = block_layout(x.shape, block_size=block_size, axis=axis)
    noise = uniform_noise(x, generator=generator, seed=seed) if rounding == "stochastic" else None
    return fmt, layout, noise


def quantize_mx(
    x: torch.Tensor,
    elem_format: str | ElemFormat,
    *,
    block_size: int = 32,
    axis: int = -1,
    rounding: str = "nearest_even",
    scale_rule: str = "floor",
    generator: torch.Generator | None = None,
    seed: int | None = None,
    compile: bool = False,
    for_gemm: bool = False,
) -> torch.Tensor:
    """Fake-quantize ``x`` to MX ``elem_format`` with E8M0 block scales (module docstring).

    Args:
        x: float32 / bfloat16 / float16 tensor, any shape, any device.
        elem_format: ``fp8_e4m3``, ``fp8_e5m2``, ``fp6_e3m2``, ``fp6_e2m3``,
            ``fp4_e2m1`` or ``int8`` (or an ``ElemFormat``).
        block_size: elements sharing one scale (the spec's k = 32).
        axis: the axis the blocks run along.
        rounding: ``nearest_even`` | ``nearest_away`` | ``toward_zero`` | ``stochastic``.
        scale_rule: ``floor`` (spec) | ``ceil`` | ``rceil`` | ``even``.
        generator, seed: randomness for ``stochastic`` (ignored otherwise).
        compile: run the same function under ``torch.compile`` (same bits).
        for_gemm: return the values in BF16 where that is exact (:func:`exact_in_bf16`), for the
            emulated backend's BF16 GEMMs; otherwise (and where it is not exact) ``x``'s dtype.

    Returns:
        A tensor of ``x``'s shape, in ``x``'s dtype (BF16 under ``for_gemm`` where exact).
    """
    fmt, layout, noise = prepare(
        x,
        elem_format,
        block_size=block_size,
        axis=axis,
        rounding=rounding,
        scale_rule=scale_rule,
        generator=generator,
        seed=seed,
    )
    if x.numel() == 0:
        return x.clone()
    kwargs = dict(fmt=fmt, layout=layout, rounding=rounding, scale_rule=scale_rule)
    if for_gemm:
        y, lowest = compiling.call(_fake_quant_lowest_exp, compile, x.float(), noise, **kwargs)
        return y.to(torch.bfloat16 if exact_in_bf16(int(lowest)) else x.dtype)
    y = compiling.call(_fake_quant_fp32, compile, x.float(), noise, **kwargs)
    return y.to(x.dtype)


#: log2 of BF16's smallest subnormal: ``k * 2^e`` with ``|k| < 2^8`` and ``e >= BF16_MIN_EXP``
#: is exactly representable in BF16 (its exponent range is FP32's)
BF16_MIN_EXP = -133


def exact_in_bf16(lowest_exp: int) -> bool:
    """Whether MX values whose smallest quantum is ``2^lowest_exp`` are all exact in BF16.

    Every MX value is ``r * 2^(qe + se)`` with ``|r| < 2^8`` (at most 3 mantissa bits plus the
    implicit one; int8: 7 bits), ``qe >= emin - mbits`` the element quantum and ``se`` the block
    scale exponent, so it is exact in BF16 (8 exponent bits, 8 significant bits, subnormals down
    to 2^-133) unless ``se + emin - mbits < -133`` in a block holding a non-zero value, e.g. an
    E4M3 subnormal times 2^-127. ``quantize_mx(for_gemm=True)`` takes ``lowest_exp`` from the
    block exponents (one small reduction, no pass over the elements).
    """
    return lowest_exp >= BF16_MIN_EXP


def _fake_quant_lowest_exp(
    x32: torch.Tensor, noise: torch.Tensor | None, *, fmt: ElemFormat, layout: BlockLayout, rounding: str,
    scale_rule: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``_fake_quant_fp32`` and the lowest quantum exponent ``se + emin - mbits`` over blocks with a
    non-zero amax (int64 0-d; +2^20 when there is none)."""
    xb = to_blocks(x32, layout)
    nb = None if noise is None else to_blocks(noise, layout)
    m = quantize_blocks(xb, nb, fmt=fmt, rounding=rounding, scale_rule=scale_rule)
    lowest = torch.where(m.amax > 0, m.se, 1 << 20).amin().long() + (fmt.emin - fmt.mbits)
    return from_blocks(_dequantized(m), layout), lowest


def quantize_mx_compiled(x: torch.Tensor, elem_format: str | ElemFormat, **kwargs: Any) -> torch.Tensor:
    """``quantize_mx(..., compile=True)``: the same function under ``torch.compile``, same bits."""
    return quantize_mx(x, elem_format, compile=True, **kwargs)
