"""FP8 element formats and the per-tensor quantize / dequantize primitive.

Numerics
--------
Formats (OCP 8-bit floating point, as in torch's float8 dtypes and TE):

============  ===============  =====  ==================  ===================  ============
name          torch dtype      max    smallest normal     smallest subnormal   specials
============  ===============  =====  ==================  ===================  ============
``e4m3``      float8_e4m3fn    448    2^-6                2^-9                 NaN only, no Inf
``e5m2``      float8_e5m2      57344  2^-14               2^-16                Inf and NaN
============  ===============  =====  ==================  ===================  ============

Quantize-dequantize with a per-tensor (or broadcast) FP32 ``scale``::

    y  = fp32(x) * scale                      (one FP32 rounding, as in TE's kernels)
    q  = cast_fp8(clamp(y, -max, +max))       (round-to-nearest-even by torch's cast)
    x' = fp32(q) / scale, then cast to x.dtype

* **Rounding**: torch's float -> float8 cast rounds to nearest, ties to even
  mantissa (checked against an independent grid reference in the tests).
* **Saturation**: finite values beyond ``max`` and +-Inf clamp to +-max. TE's
  casts saturate the same way (``__nv_fp8_e4m3`` / ``__nv_fp8_e5m2`` convert with
  ``__NV_SATFINITE``), so E5M2's Inf is never produced by a quantize here even
  though the format has one.
* **Underflow**: a scaled value below half the smallest subnormal (2^-10 for
  E4M3, 2^-17 for E5M2) rounds to (signed) zero; exactly half is a tie and
  rounds to the even neighbour, zero. Between half and one subnormal it rounds
  up to the smallest subnormal. Subnormals are kept (no flush-to-zero).
* **NaN** propagates element-wise (clamp keeps NaN, the cast maps it to the
  format's NaN, dequantize gives NaN back).
* **amax** (:func:`amax`) ignores NaN and keeps Inf, like TE's kernels, which
  reduce with ``fmaxf`` (a NaN element never poisons the scale; it still comes
  out as NaN in the quantized tensor).

Where this emulation may differ from TE's CUDA kernels:

* TE dequantizes with ``scale_inv = 1/scale`` computed once in FP32 (and a GEMM
  applies ``scale_inv_a * scale_inv_b`` to the FP32 accumulator).
  :func:`quantize_fp8` divides by ``scale`` instead: identical for power-of-2
  scales, may differ by 1 ulp of FP32 otherwise. :func:`dequantize_fp8` is the
  TE-style ``q * scale_inv``.
* The dequantized value is rounded once more to ``x.dtype`` (e.g. BF16); TE's
  GEMMs never materialise that tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "E4M3",
    "E5M2",
    "FP8_FORMATS",
    "FP8Format",
    "amax",
    "cast_to_fp8",
    "dequantize_fp8",
    "format_for_role",
    "get_format",
    "quantize_fp8",
    "FORWARD_ROLES",
    "BACKWARD_ROLES",
]

FLT_MAX = float(torch.finfo(torch.float32).max)


@dataclass(frozen=True)
class FP8Format:
    """One 8-bit float format: bit layout and the torch dtype that stores it."""

    name: str
    dtype: torch.dtype
    exponent_bits: int
    mantissa_bits: int
    bias: int
    max: float
    """Largest finite magnitude; quantize saturates to it."""
    min_normal: float
    min_subnormal: float
    has_inf: bool

    @property
    def element(self) -> str:
        """The element name recipe configs and statistics use for it: ``fp8_e4m3`` / ``fp8_e5m2``
        (``recipe.*_format``, ``recipes.numerics.get_spec``)."""
        return f"fp8_{self.name}"


E4M3 = FP8Format(
    name="e4m3",
    dtype=torch.float8_e4m3fn,
    exponent_bits=4,
    mantissa_bits=3,
    bias=7,
    max=448.0,
    min_normal=2.0**-6,
    min_subnormal=2.0**-9,
    has_inf=False,
)
E5M2 = FP8Format(
    name="e5m2",
    dtype=torch.float8_e5m2,
    exponent_bits=5,
    mantissa_bits=2,
    bias=15,
    max=57344.0,
    min_normal=2.0**-14,
    min_subnormal=2.0**-16,
    has_inf=True,
)
FP8_FORMATS: dict[str, FP8Format] = {"e4m3": E4M3, "e5m2": E5M2}

# Tensor roles in a Linear, named as TE's fp8 meta does. Under HYBRID the
# forward roles use E4M3 and the backward roles E5M2.
FORWARD_ROLES = ("input", "weight", "output")
BACKWARD_ROLES = ("grad_output", "grad_input")


def get_format(fmt: str | FP8Format) -> FP8Format:
    """Resolve ``"e4m3"`` / ``"E4M3"`` / ``"e5m2"`` (or an :class:`FP8Format`)."""
    if isinstance(fmt, FP8Format):
        return fmt
    key = str(fmt).lower().replace("fn", "")
    if key not in FP8_FORMATS:
        raise ValueError(f"unknown FP8 format {fmt!r}; expected one of {sorted(FP8_FORMATS)}")
    return FP8_FORMATS[key]


def format_for_role(fp8_format: str, role: str) -> FP8Format:
    """TE's ``Format`` rule: ``E4M3`` everywhere, or ``HYBRID`` = E4M3 forward, E5M2 backward."""
    if role not in FORWARD_ROLES + BACKWARD_ROLES:
        raise ValueError(f"unknown tensor role {role!r}; expected one of {FORWARD_ROLES + BACKWARD_ROLES}")
    kind = fp8_format.upper()
    if kind == "E4M3":
        return E4M3
    if kind == "HYBRID":
        return E4M3 if role in FORWARD_ROLES else E5M2
    raise ValueError(f"fp8_format={fp8_format!r} is not supported; use 'E4M3' or 'HYBRID'")


def amax(x: torch.Tensor, dim: int | tuple[int, ...] | None = None, *, keepdim: bool = False) -> torch.Tensor:
    """FP32 ``max|x|`` (over ``dim``, or all elements), ignoring NaN like TE's ``fmaxf`` reductions.

    Inf is kept. An empty tensor gives 0 (TE zeroes its amax buffer before reducing).
    """
    if x.numel() == 0 and dim is None:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    a = torch.nan_to_num(x.abs(), nan=0.0, posinf=math.inf)
    if dim is None:
        return a.amax().float()
    return a.amax(dim=dim, keepdim=keepdim).float()


def _as_scale(scale: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    if isinstance(scale, torch.Tensor):
        return scale.to(device=device, dtype=torch.float32)
    return torch.tensor(float(scale), dtype=torch.float32, device=device)


def cast_to_fp8(
    x: torch.Tensor, fmt: str | FP8Format, scale: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize to a real float8 tensor: ``(q, scale_inv)`` with ``q = cast(clamp(x*scale))``.

    ``scale`` is FP32 and broadcasts against ``x``; ``scale_inv = 1/scale`` in
    FP32, as TE stores it (a GEMM multiplies its accumulator by
    ``scale_inv_a * scale_inv_b``). See the module docstring for rounding,
    saturation, underflow and NaN.
    """
    f = get_format(fmt)
    s = _as_scale(scale, x.device)
    y = x.float() * s
    q = y.clamp(-f.max, f.max).to(f.dtype)
    return q, torch.reciprocal(s)


def dequantize_fp8(
    q: torch.Tensor, scale_inv: torch.Tensor | float, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """TE-style dequantize: ``fp32(q) * scale_inv``, cast to ``dtype``."""
    return (q.float() * _as_scale(scale_inv, q.device)).to(dtype)


def quantize_fp8(x: torch.Tensor, fmt: str | FP8Format, scale: torch.Tensor | float) -> torch.Tensor:
    """Quantize-dequantize ``x`` through FP8 with a given FP32 ``scale`` (same shape and dtype out).

    ``x' = fp32(cast_fp8(clamp(fp32(x)*scale, -max, max))) / scale``: RNE, saturating,
    subnormals kept, values below half the smallest subnormal flush to signed zero
    by the rounding itself, NaN propagates. ``scale`` broadcasts against ``x``.
    """
    q, _ = cast_to_fp8(x, fmt, scale)
    return (q.float() / _as_scale(scale, x.device)).to(x.dtype)
