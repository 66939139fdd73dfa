"""FP8 emulation: pure quantize functions and small state objects (no autograd, no modules).

What is emulated, layer by layer:

* :mod:`recipes.fp8.formats`   E4M3 (OCP e4m3fn: max 448, NaN, no Inf) and E5M2
  (max 57344, Inf, NaN) through torch's float8 dtypes.
  ``quantize_fp8(x, fmt, scale) = fp32(cast_fp8(clamp(x*scale, +-max))) / scale``:
  round-to-nearest-even, saturating (as TE's ``__NV_SATFINITE`` casts),
  subnormals kept, NaN propagates; amax ignores NaN like TE's ``fmaxf``.
* :mod:`recipes.fp8.scaling`   the scale rule ``(fp8_max/amax)/2^margin`` with
  TE's edge cases (amax 0 / non-finite keeps the previous scale, FP32 overflow
  -> FLT_MAX, optional ``amax_epsilon`` floor and power-of-2 rounding down) and
  per-tensor current scaling (TE ``Float8CurrentScaling``).
* :mod:`recipes.fp8.delayed`   TE ``DelayedScaling``: scales from the amax
  history of earlier steps, all tensors in one stacked buffer.
* :mod:`recipes.fp8.blockwise` rowwise scales (torchao ``rowwise``) and TE
  ``Float8BlockScaling`` 1x128 / 128x128 tiles with FP32 (power-of-2 by default) scales.

Every scale is FP32; only the tensors passed in are quantized. Each module's
docstring states its formulas and where it may differ from TE's CUDA kernels.
"""

from recipes.fp8.blockwise import (
    Float8BlockScaling,
    cast_to_fp8_block_1d,
    cast_to_fp8_block_2d,
    cast_to_fp8_rowwise,
    quantize_fp8_block_1d,
    quantize_fp8_block_2d,
    quantize_fp8_rowwise,
)
from recipes.fp8.delayed import DelayedScaling, DelayedScalingState
from recipes.fp8.formats import (
    BACKWARD_ROLES,
    E4M3,
    E5M2,
    FORWARD_ROLES,
    FP8_FORMATS,
    FP8Format,
    amax,
    cast_to_fp8,
    dequantize_fp8,
    format_for_role,
    get_format,
    quantize_fp8,
)
from recipes.fp8.scaling import (
    Float8CurrentScaling,
    compute_scale,
    current_scale,
    quantize_fp8_current,
    round_scale_down_to_power_of_2,
    scale_from_amax,
)

__all__ = [
    "BACKWARD_ROLES",
    "E4M3",
    "E5M2",
    "FORWARD_ROLES",
    "FP8_FORMATS",
    "DelayedScaling",
    "DelayedScalingState",
    "FP8Format",
    "Float8BlockScaling",
    "Float8CurrentScaling",
    "amax",
    "cast_to_fp8",
    "cast_to_fp8_block_1d",
    "cast_to_fp8_block_2d",
    "cast_to_fp8_rowwise",
    "compute_scale",
    "current_scale",
    "dequantize_fp8",
    "format_for_role",
    "get_format",
    "quantize_fp8",
    "quantize_fp8_block_1d",
    "quantize_fp8_block_2d",
    "quantize_fp8_current",
    "quantize_fp8_rowwise",
    "round_scale_down_to_power_of_2",
    "scale_from_amax",
]
