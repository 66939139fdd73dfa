"""Numerics statistics of a tensor against a low-precision format: pure functions, no host sync.

Numerics
--------
A :class:`FormatSpec` names what a tensor *would* be quantized to; a short
name resolves it (:func:`get_spec`):

==============================  =======  =====================================================
names                           family   quantizer (reused, never reimplemented here)
==============================  =======  =====================================================
``mxfp8_e4m3`` ``mxfp8_e5m2``   mx       ``recipes.mx.quantize_mx``: 32-element blocks along
``mxfp6_e3m2`` ``mxfp6_e2m3``            ``axis``, E8M0 scale ``floor`` (OCP), nearest-even,
``mxfp4_e2m1`` ``mxint8``                saturating; a NaN/Inf in a block makes the block NaN
``nvfp4``                       nvfp4    ``recipes.mx.quantize_nvfp4``: E2M1, 16-element blocks
                                         with E4M3 scales + FP32 tensor scale, nearest-even
``fp8_e4m3`` ``fp8_e5m2``       fp8      ``recipes.fp8.quantize_fp8`` with the per-tensor
                                         *current* scale ``recipes.fp8.current_scale``
                                         (``448/amax`` resp. ``57344/amax``, TE's edge cases)
``bf16`` ``fp16`` ``fp32``      cast     ``x.to(dtype)``: IEEE round-to-nearest-even, no scale
==============================  =======  =====================================================

A spec with another block size or scale rule (e.g. the ``rceil`` rule of the
``mxfp8`` recipe) is ``dataclasses.replace(get_spec("mxfp8_e4m3"), scale_rule="rceil")``.

Every statistic is computed on ``fp32(x)`` and its float32 dequantization
``q = quantize_like(fp32(x), spec)``, so it measures the format, not a second
rounding back to ``x``'s dtype. Sums of squares accumulate in float64 (the
squares of fp32 gradients below ~1e-23 vanish in float32); that costs one
float64 temporary of ``x``'s size, on stat steps only. Results are 0-dim
tensors on ``x``'s device: nothing here calls ``.item()``.

Definitions (``x`` finite, ``q`` its quantized value):

* ``zero_frac``: exact zeros (+0 and -0) over all elements.
* ``nonfinite_frac``: NaN and +-Inf over all elements. **Non-finite elements
  of ``x`` are left out of every other statistic** (norm, absmax, the counts,
  the sums), so one Inf does not blank the rest; this key reports them.
* ``underflow_frac``: elements with ``x != 0`` and ``q == 0`` (either sign),
  over the **finite non-zero elements of the whole tensor** (0 when there are
  none). Exact zeros are neither underflows nor in the denominator; an
  element of an MX NaN block (``q`` NaN) is in the denominator, never an underflow.
* ``overflow_frac``: elements that overflow in the IEEE sense: rounded to the
  format's precision with an unbounded exponent range, their magnitude would
  exceed the largest finite value ``max``, so saturation (mx, nvfp4, fp8) or
  Inf (cast) changes them beyond ordinary rounding. Over the finite elements.
  With ``u`` the spacing of the format's values just below ``max``, a scaled
  magnitude ``|v|`` overflows when ``|v| > max + u/2``, or ``== max + u/2`` when
  ``max``'s grid index is odd (round-half-to-even then goes up). Per family:

  - mx: ``v = x / X`` with the block scale ``X`` of the spec's scale rule.
    fp4_e2m1: ``|v| >= 7`` (a value in (6, 7) clamps to 6 but would round to 6
    anyway, so it does not count); fp6_e3m2 ``>= 30``; fp6_e2m3 ``>= 7.75``;
    fp8_e4m3 ``> 464`` (448's index 14 is even); fp8_e5m2 ``>= 61440``;
    int8 ``>= 127.5/64``. Elements of a NaN block are not counted. ``rceil``
    scales never overflow; ``floor`` scales can, in a block's top binade.
  - nvfp4: **0 by construction**: with the computed tensor scale a block's
    E4M3 scale is ``amax_b/6`` rounded to 3 mantissa bits (relative error
    <= 2^-4) or raised by the 2^-6 clamp, so ``|v| <= 6/(1 - 2^-4) = 6.4 < 7``.
  - fp8: ``v = fp32(x) * scale``; with current scaling ``|v| <= 448(1+2^-23)``,
    so 0 unless the scale fell back to 1.0 (amax Inf: the finite elements
    above 464 / 61440 overflow).
  - cast: ``q`` is +-Inf (fp16: ``|x| >= 65520``; bf16 near FLT_MAX).

* ``sqnr_db = 10 log10(sum x^2 / sum (x-q)^2)`` and ``rel_error = ||x-q|| / ||x||``
  over the finite elements of ``x``. ``q == x`` exactly gives ``+inf`` dB and
  0 (also for an all-zero or empty tensor); ``x`` all zero with ``q != x``
  gives ``-inf`` dB and ``inf``. A finite ``x`` whose ``q`` is not finite (fp16
  overflow, an MX block poisoned by a NaN neighbour) has infinite error:
  ``-inf`` dB.
* ``norm`` (L2) and ``absmax`` of the finite elements; 0 for an empty tensor.

Shards and ranks: :func:`tensor_sums` returns additive sufficient statistics
(counts and float64 sums; ``absmax`` reduces with max, see :data:`REDUCE_OPS`),
and :func:`stats_from_sums` turns reduced sums into the keys above. Summing
shards equals the whole tensor only where quantizing a shard equals quantizing
that part of the whole: casts, and mx/nvfp4-block shards cut on block
boundaries (not per-tensor scales: fp8, nvfp4's tensor scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from recipes.fp8 import current_scale, quantize_fp8
from recipes.fp8 import get_format as get_fp8_format
from recipes.mx import FORMATS as MX_FORMATS
from recipes.mx import quantize_mx, quantize_nvfp4
from recipes.mx.core import block_amax, block_layout, block_scales, shared_exponent, to_blocks
from recipes.mx.formats import SCALE_RULES

__all__ = [
    "FAMILIES",
    "FORMAT_SPECS",
    "REDUCE_OPS",
    "FormatSpec",
    "get_spec",
    "overflow_fraction",
    "quantize_like",
    "relative_error",
    "sqnr_db",
    "stats_from_sums",
    "tensor_stats",
    "tensor_sums",
    "underflow_fraction",
    "zero_fraction",
]

FAMILIES = ("mx", "nvfp4", "fp8", "cast")
_CAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class FormatSpec:
    """What a tensor would be quantized to (module docstring has the table)."""

    name: str
    family: str
    """mx | nvfp4 | fp8 | cast"""
    elem: str
    """mx: a ``recipes.mx`` element format; nvfp4: ``fp4_e2m1``; fp8: ``e4m3`` | ``e5m2``;
    cast: a torch dtype name (``bfloat16``, ``float16``, ``float32``)."""
    block_size: int = 0
    """Elements per scale block along ``axis`` (mx 32, nvfp4 16); 0 for fp8 and cast."""
    scale_rule: str = "floor"
    """mx only: E8M0 scale rule (floor | ceil | rceil | even)."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"FormatSpec {self.name!r}: family {self.family!r} is not one of {FAMILIES}")
        if self.family == "mx":
            if self.elem not in MX_FORMATS:
                raise ValueError(
                    f"FormatSpec {self.name!r}: MX element {self.elem!r} not in {list(MX_FORMATS)}"
                )
            if self.block_size < 1 or self.scale_rule not in SCALE_RULES:
                raise ValueError(
                    f"FormatSpec {self.name!r}: needs block_size >= 1 and scale_rule in {SCALE_RULES}"
                )
        elif self.family == "fp8":
            get_fp8_format(self.elem)
        elif self.family == "cast" and self.elem not in _CAST_DTYPES:
            raise ValueError(
                f"FormatSpec {self.name!r}: cast dtype {self.elem!r} not in {list(_CAST_DTYPES)}"
            )

    @property
    def max_value(self) -> float:
        """Largest finite magnitude of the element format (before any scale)."""
        if self.family in ("mx", "nvfp4"):
            return MX_FORMATS[self.elem].max_norm
        if self.family == "fp8":
            return get_fp8_format(self.elem).max
        return float(torch.finfo(_CAST_DTYPES[self.elem]).max)


def _mx(name: str, elem: str) -> FormatSpec:
    return FormatSpec(name, "mx", elem, block_size=32, scale_rule="floor")


FORMAT_SPECS: dict[str, FormatSpec] = {
    s.name: s
    for s in (
        _mx("mxfp8_e4m3", "fp8_e4m3"),
        _mx("mxfp8_e5m2", "fp8_e5m2"),
        _mx("mxfp6_e3m2", "fp6_e3m2"),
        _mx("mxfp6_e2m3", "fp6_e2m3"),
        _mx("mxfp4_e2m1", "fp4_e2m1"),
        _mx("mxint8", "int8"),
        FormatSpec("nvfp4", "nvfp4", "fp4_e2m1", block_size=16),
        FormatSpec("fp8_e4m3", "fp8", "e4m3"),
        FormatSpec("fp8_e5m2", "fp8", "e5m2"),
        FormatSpec("bf16", "cast", "bfloat16"),
        FormatSpec("fp16", "cast", "float16"),
        FormatSpec("fp32", "cast", "float32"),
    )
}

#: how each key of :func:`tensor_sums` reduces across shards / ranks
REDUCE_OPS: dict[str, str] = {
    "num_elements": "sum",
    "num_nonfinite": "sum",
    "num_zero": "sum",
    "sum_sq": "sum",
    "absmax": "max",
    "num_nonzero": "sum",
    "num_underflow": "sum",
    "num_overflow": "sum",
    "err_sq": "sum",
}


def get_spec(spec: str | FormatSpec) -> FormatSpec:
    """Resolve a short name (``"mxfp4_e2m1"``, ``"fp8_e4m3"``, ``"bf16"``...); a FormatSpec passes through."""
    if isinstance(spec, FormatSpec):
        return spec
    try:
        return FORMAT_SPECS[spec]
    except KeyError:
        raise ValueError(f"unknown format {spec!r}; valid names: {', '.join(FORMAT_SPECS)}") from None


def mx_format_name(elem: str) -> str:
    """The statistics name of an MX element format: ``fp8_e4m3`` -> ``mxfp8_e4m3``, ``int8`` -> ``mxint8``."""
    return f"mx{elem}"


# ---------------------------------------------------------------- quantize


def _fp8_scale(x32: torch.Tensor, spec: FormatSpec) -> torch.Tensor:
    return current_scale(x32, spec.elem)


def quantize_like(x: torch.Tensor, spec: str | FormatSpec, *, axis: int = -1) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``spec``'s format, ``x``'s shape and dtype.

    ``axis`` is the axis the blocks run along (mx, nvfp4); fp8 and casts ignore
    it. A 0-dim ``x`` is treated as one element.
    """
    s = get_spec(spec)
    if x.dim() == 0:
        return quantize_like(x.reshape(1), s).reshape(())
    if s.family == "mx":
        return quantize_mx(x, s.elem, block_size=s.block_size, axis=axis, scale_rule=s.scale_rule)
    if s.family == "nvfp4":
        return quantize_nvfp4(x, axis=axis)
    if s.family == "fp8":
        return quantize_fp8(x, s.elem, _fp8_scale(x, s))
    return x.to(_CAST_DTYPES[s.elem]).to(x.dtype)


def overflow_bound(max_value: float, ulp: float) -> tuple[float, bool]:
    """(threshold, inclusive): ``|v|`` overflows past ``threshold`` (IEEE overflow under RNE;
    ``ulp``: the spacing of the format's top binade). Shared with ``recipes.blockstats``."""
    index = round(max_value / ulp)
    return max_value + ulp / 2, index % 2 == 1


def overflows(v_abs: torch.Tensor, bound: tuple[float, bool]) -> torch.Tensor:
    t, inclusive = bound
    return v_abs >= t if inclusive else v_abs > t


def _num_overflow(
    x32: torch.Tensor, spec: FormatSpec, axis: int, q32: torch.Tensor | None = None
) -> torch.Tensor:
    """int64 0-dim count of the finite elements that overflow (module docstring, per family).

    ``q32``: the cast result when the caller has it (only the cast family reads it).
    """
    zero = torch.zeros((), dtype=torch.int64, device=x32.device)
    if x32.numel() == 0 or spec.family == "nvfp4":
        return zero  # nvfp4: 0 by construction (module docstring)
    if spec.family == "cast":
        q32 = quantize_like(x32, spec) if q32 is None else q32
        return (torch.isfinite(x32) & ~torch.isfinite(q32)).sum()
    if spec.family == "fp8":
        f = get_fp8_format(spec.elem)
        ulp = 2.0 ** (math.floor(math.log2(f.max)) - f.mantissa_bits)
        v = x32.abs() * _fp8_scale(x32, spec)  # the product cast_to_fp8 forms (|.| commutes)
        return (overflows(v, overflow_bound(f.max, ulp)) & torch.isfinite(x32)).sum()
    fmt = MX_FORMATS[spec.elem]
    ulp = 2.0**-fmt.mbits if fmt.is_int else 2.0 ** (fmt.emax - fmt.mbits)
    layout = block_layout(x32.shape, block_size=spec.block_size, axis=axis)
    xb = to_blocks(x32, layout)
    se, nan = shared_exponent(block_amax(xb), fmt=fmt, scale_rule=spec.scale_rule)
    _, inv = block_scales(se, nan)  # exact powers of two, NaN in NaN blocks (never counted)
    return overflows(xb.abs() * inv, overflow_bound(fmt.max_norm, ulp)).sum()


# ---------------------------------------------------------------- sums and stats


def as_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` detached as float32, a 0-dim tensor as 1 element (every statistic here starts so)."""
    x = x.detach()
    x = x.reshape(1) if x.dim() == 0 else x
    return x if x.dtype == torch.float32 else x.float()


def signal_noise_sums(x: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``sum x^2`` and ``sum (x-q)^2`` over finite ``x`` (a non-finite ``q`` there: infinite error)."""
    finite = torch.isfinite(x)
    xd = torch.where(finite, x, 0).double()
    err = torch.where(torch.isfinite(q), xd - q.double(), math.inf)
    err = torch.where(finite, err, 0)
    return (xd * xd).sum(), (err * err).sum()


def db_from_sums(signal: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    safe = torch.where(noise > 0, noise, 1.0)
    return torch.where(noise > 0, 10.0 * torch.log10(signal / safe), math.inf).float()


def rel_from_sums(signal: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    safe = torch.where(signal > 0, signal, 1.0)
    rel = torch.where(signal > 0, torch.sqrt(noise / safe), math.inf)
    return torch.where(noise > 0, rel, 0.0).float()


def fraction(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` as float32, 0 where ``den`` is 0 (no host sync)."""
    return torch.where(den > 0, num.double() / den.clamp(min=1).double(), 0.0).float()


def tensor_sums(
    x: torch.Tensor, spec: str | FormatSpec | None = None, *, axis: int = -1
) -> dict[str, torch.Tensor]:
    """Additive sufficient statistics of ``x`` (and of its quantization to ``spec``, quantized once).

    Keys: ``num_elements``, ``num_nonfinite``, ``num_zero`` (int64), ``sum_sq``
    (float64, finite elements), ``absmax`` (float32, reduce with max); with a
    spec also ``num_nonzero`` (finite non-zero), ``num_underflow``,
    ``num_overflow`` (int64) and ``err_sq`` (float64). See :data:`REDUCE_OPS`.
    """
    x32 = as_fp32(x)
    dev = x32.device
    finite = torch.isfinite(x32)
    a = torch.where(finite, x32.abs(), 0.0)
    sums = {
        "num_elements": torch.full((), x32.numel(), dtype=torch.int64, device=dev),  # no H2D copy
        "num_nonfinite": (~finite).sum(),
        "num_zero": (x32 == 0).sum(),
        "absmax": a.amax() if x32.numel() else torch.zeros((), device=dev),
    }
    if spec is None:
        xd = a.double()
        sums["sum_sq"] = (xd * xd).sum()
        return sums
    s = get_spec(spec)
    q32 = quantize_like(x32, s, axis=axis)
    nonzero = finite & (x32 != 0)
    sums["sum_sq"], sums["err_sq"] = signal_noise_sums(x32, q32)
    sums["num_nonzero"] = nonzero.sum()
    sums["num_underflow"] = (nonzero & (q32 == 0)).sum()
    sums["num_overflow"] = _num_overflow(x32, s, axis, q32)
    return sums


def stats_from_sums(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float32 0-dim statistics (module docstring) from (possibly reduced) :func:`tensor_sums`."""
    n = sums["num_elements"]
    out = {
        "norm": torch.sqrt(sums["sum_sq"]).float(),
        "absmax": sums["absmax"].float(),
        "zero_frac": fraction(sums["num_zero"], n),
        "nonfinite_frac": fraction(sums["num_nonfinite"], n),
    }
    if "err_sq" in sums:
        out["underflow_frac"] = fraction(sums["num_underflow"], sums["num_nonzero"])
        out["overflow_frac"] = fraction(sums["num_overflow"], n - sums["num_nonfinite"])
        out["sqnr_db"] = db_from_sums(sums["sum_sq"], sums["err_sq"])
        out["rel_error"] = rel_from_sums(sums["sum_sq"], sums["err_sq"])
    return out


def tensor_stats(
    x: torch.Tensor, spec: str | FormatSpec | None = None, *, axis: int = -1
) -> dict[str, torch.Tensor]:
    """``norm``, ``absmax``, ``zero_frac``, ``nonfinite_frac``; with ``spec`` also
    ``underflow_frac``, ``overflow_frac``, ``sqnr_db``, ``rel_error`` (one quantize).

    Float32 0-dim tensors on ``x``'s device; the caller prefixes the keys
    (``grad/<layer>/underflow_frac``) and decides when to ``.item()``.
    """
    return stats_from_sums(tensor_sums(x, spec, axis=axis))


# ---------------------------------------------------------------- single statistics


def zero_fraction(x: torch.Tensor) -> torch.Tensor:
    """Fraction of exact zeros (+0, -0) over all elements; 0 for an empty tensor."""
    x = x.detach()
    return fraction((x == 0).sum(), torch.full((), x.numel(), dtype=torch.int64, device=x.device))


def underflow_fraction(x: torch.Tensor, spec: str | FormatSpec, *, axis: int = -1) -> torch.Tensor:
    """Finite non-zero elements that quantize to zero, over the finite non-zero elements (0 if none)."""
    return tensor_stats(x, spec, axis=axis)["underflow_frac"]


def overflow_fraction(x: torch.Tensor, spec: str | FormatSpec, *, axis: int = -1) -> torch.Tensor:
    """Finite elements that overflow the format (IEEE sense; per family in the module docstring),
    over the finite elements (0 if none)."""
    x32 = as_fp32(x)
    return fraction(_num_overflow(x32, get_spec(spec), axis), torch.isfinite(x32).sum())


def sqnr_db(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``10 log10(sum x^2 / sum (x-q)^2)`` over finite ``x``: +inf when ``q == x``, -inf if ``x`` is all 0."""
    return db_from_sums(*signal_noise_sums(as_fp32(x), q.detach()))


def relative_error(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``||x - q|| / ||x||`` over finite ``x``: 0 when ``q == x``, inf if ``x`` is all 0 and ``q`` is not."""
    return rel_from_sums(*signal_noise_sums(as_fp32(x), q.detach()))
