"""FP8 scale rules and per-tensor *current* scaling (TE ``Float8CurrentScaling``).

Numerics
--------
A scale maps a tensor's (or block's) amax onto the format's largest value; the
quantized tensor is ``cast_fp8(clamp(x*scale))`` and dequantizes as
``q/scale`` (see :mod:`recipes.fp8.formats`). One rule, :func:`compute_scale`,
serves every recipe here and follows TE's kernels
(``delayed_scaling.cu`` and ``recipe_common.cuh::compute_scale_from_amax``), in order:

1. ``amax = max(amax, amax_epsilon)``                       (TE: ``if amax < eps: amax = eps``)
2. if ``amax`` is 0, Inf or NaN: ``scale = prev_scale`` (1.0 when there is none)
3. else ``scale = fp32(fp8_max * 2^-margin) / amax``       (one FP32 division, RNE)
4. if ``scale`` overflowed to Inf (amax < fp8_max/FLT_MAX): ``scale = FLT_MAX``
5. if ``power_2_scale``: keep sign and exponent bits only
   (``bits & 0xFF800000``), i.e. round the scale *down* to a power of two, so
   ``amax*scale`` never exceeds ``fp8_max`` and ``q/scale`` is exact.

TE's delayed-scaling update keeps the *previous* scale in step 2 (and has no
epsilon or power-of-2 option); its current and block scaling return 1.0
(there is no previous scale). Passing ``prev_scale=None`` gives the latter.

*Current scaling* (this module): the scale comes from the amax of the tensor
being quantized right now (one extra reduction pass; no history, no
cross-rank state). E4M3 for input and weight, E5M2 for grad tensors under
``HYBRID``. TE defaults: ``power_2_scale=False``, ``amax_epsilon=0``.
What stays high precision: everything but the GEMM operands (the caller
decides which tensors it quantizes); scales are FP32.

Differences from TE: the amax of the current-scaling tensor is computed once
over the whole tensor; TE's columnwise (transposed) copy uses the same scale,
so there is nothing to differ. Margin is accepted for symmetry; TE's
``Float8CurrentScaling`` has none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recipes.fp8.formats import FLT_MAX, FP8Format, format_for_role, get_format, quantize_fp8
from recipes.fp8.formats import amax as tensor_amax

__all__ = [
    "Float8CurrentScaling",
    "compute_scale",
    "current_scale",
    "quantize_fp8_current",
    "round_scale_down_to_power_of_2",
    "scale_from_amax",
]

_SIGN_EXP_MASK = -(1 << 23)  # 0xFF800000 as a signed int32: sign + exponent bits of an fp32


def round_scale_down_to_power_of_2(scale: torch.Tensor) -> torch.Tensor:
    """Zero the mantissa bits of an FP32 scale: ``2^floor(log2 scale)`` exactly, for normal scales.

    Bit masking, as TE does. (torchao's ``exp2(floor(log2(s)))`` evaluates log2 in
    FP32 and can round a scale just below a power of two *up* to it.)
    """
    s = scale.to(torch.float32)
    return (s.view(torch.int32) & _SIGN_EXP_MASK).view(torch.float32)


def scale_from_amax(
    amax: torch.Tensor,
    fp8_max: torch.Tensor | float,
    *,
    margin: float = 0.0,
    prev_scale: torch.Tensor | float | None = None,
    power_2_scale: bool = False,
    amax_epsilon: float = 0.0,
    value_for_inf: float = FLT_MAX,
) -> torch.Tensor:
    """Vectorised :func:`compute_scale` over an amax tensor; ``fp8_max`` may be a per-element tensor.

    ``value_for_inf`` replaces a scale that overflowed FP32 (TE: FLT_MAX for
    delayed and current scaling, the input dtype's max for block scaling).
    """
    a = amax.to(torch.float32)
    if amax_epsilon > 0.0:
        a = torch.where(a < amax_epsilon, torch.full_like(a, amax_epsilon), a)
    fmax = torch.as_tensor(fp8_max, dtype=torch.float32, device=a.device)
    scaled_max = fmax * torch.tensor(2.0 ** (-margin), dtype=torch.float32, device=a.device)
    if prev_scale is None:
        prev = torch.ones_like(a)
    else:
        prev = torch.as_tensor(prev_scale, dtype=torch.float32, device=a.device).expand_as(a)
    valid = torch.isfinite(a) & (a > 0)
    scale = torch.where(valid, scaled_max / torch.where(valid, a, torch.ones_like(a)), prev)
    scale = torch.where(torch.isinf(scale), torch.full_like(scale, value_for_inf), scale)
    if power_2_scale:
        scale = round_scale_down_to_power_of_2(scale)
    return scale


def compute_scale(
    amax: torch.Tensor | float,
    fmt: str | FP8Format,
    *,
    margin: float = 0.0,
    prev_scale: torch.Tensor | float | None = None,
    power_2_scale: bool = False,
    amax_epsilon: float = 0.0,
) -> torch.Tensor:
    """FP32 scale ``(fp8_max / amax) / 2^margin`` with TE's edge cases (module docstring, steps 1-5).

    ``amax`` of 0 or non-finite keeps ``prev_scale`` (1.0 if None), as TE's
    delayed-scaling update does; an FP32-overflowing scale becomes FLT_MAX;
    ``power_2_scale`` rounds the scale down to a power of two after that.
    """
    a = amax if isinstance(amax, torch.Tensor) else torch.tensor(float(amax), dtype=torch.float32)
    return scale_from_amax(
        a,
        get_format(fmt).max,
        margin=margin,
        prev_scale=prev_scale,
        power_2_scale=power_2_scale,
        amax_epsilon=amax_epsilon,
    )


def current_scale(
    x: torch.Tensor, fmt: str | FP8Format, *, power_2_scale: bool = False, amax_epsilon: float = 0.0
) -> torch.Tensor:
    """0-d FP32 scale from ``x``'s own amax (NaN-ignoring); 1.0 when amax is 0 or Inf, as TE."""
    return compute_scale(tensor_amax(x), fmt, power_2_scale=power_2_scale, amax_epsilon=amax_epsilon)


def quantize_fp8_current(
    x: torch.Tensor, fmt: str | FP8Format, *, power_2_scale: bool = False, amax_epsilon: float = 0.0
) -> torch.Tensor:
    """Per-tensor current scaling: ``quantize_fp8(x, fmt, current_scale(x, fmt, ...))``."""
    return quantize_fp8(x, fmt, current_scale(x, fmt, power_2_scale=power_2_scale, amax_epsilon=amax_epsilon))


@dataclass(frozen=True)
class Float8CurrentScaling:
    """Config twin of TE's ``Float8CurrentScaling`` (one ``QParams`` shared by all roles here)."""

    fp8_format: str = "HYBRID"
    """``"E4M3"`` everywhere, or ``"HYBRID"``: E4M3 for input/weight, E5M2 for grad tensors."""
    power_2_scale: bool = False
    """Round scales down to powers of two (TE env ``NVTE_FP8_CURRENT_SCALING_POWER_2_SCALES``)."""
    amax_epsilon: float = 0.0
    """Floor applied to amax before the division."""

    def __post_init__(self) -> None:
        if self.fp8_format.upper() not in ("E4M3", "HYBRID"):
            raise ValueError(f"fp8_format={self.fp8_format!r}: use 'E4M3' or 'HYBRID'")
        if self.amax_epsilon < 0:
            raise ValueError(f"amax_epsilon={self.amax_epsilon} must be >= 0")

    def format_for(self, role: str) -> FP8Format:
        return format_for_role(self.fp8_format, role)

    def quantize(self, x: torch.Tensor, role: str) -> torch.Tensor:
        """Quantize-dequantize ``x`` playing ``role`` (``"input"``, ``"weight"``, ``"grad_output"``...)."""
        return quantize_fp8_current(
            x, self.format_for(role), power_2_scale=self.power_2_scale, amax_epsilon=self.amax_epsilon
        )
