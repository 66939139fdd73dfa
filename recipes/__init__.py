"""lowbit's numerics package: precision recipes and the number formats they use.

A *recipe* decides how a model trains numerically: the DeepSpeed engine's
precision (fp32 / bf16 / fp16) and, for low-precision recipes, which GEMM
operands are quantized to which format. Recipes register by *kind* (the
``recipe.quantizer`` value) and are looked up in a registry
(``recipes.base.get_recipe``); the trainer never branches on a recipe's name
or kind.

Modules:
  recipes.base        protocol, registry by kind, conversion report
  recipes.config      the one RecipeConfig schema
  recipes.errors      ConfigError, the one user-error type
  recipes.plain       kind ``none``: fp32 / bf16 / fp16 (engine precision only)
  recipes.quantized   kinds mx, nvfp4, fp8_*: quantized GEMM operands, emulated on any device
  recipes.quantized_checks  the model-independent checks of a quantized recipe's settings
  recipes.qlinear     the quantized Linear (autograd per GEMM role) and attention matmuls
  recipes.quantizers  per-role quantizers (MX, NVFP4, FP8 delayed/current/rowwise/block) and the kind table
  recipes.compiling   the torch.compile cache and recompile headroom the quantizers share
  recipes.filter      which Linear layers convert
  recipes.numerics    statistics of a tensor against a format (FormatSpec, tensor_sums, ...)
  recipes.mx          OCP Microscaling formats and NVFP4: pure quantize/dequantize/encode functions
  recipes.fp8         FP8 formats and scaling (TE DelayedScaling emulation, current, block)
"""

# The built-in recipe kinds register on import: this is the one list of their modules.
# recipes.base imports none of them, so the registry has no import cycle.
import recipes.plain  # noqa: F401  (kind none)
import recipes.quantized  # noqa: F401  (kinds mx, nvfp4, fp8_*)
from recipes.base import (
    RECIPES,
    ConversionReport,
    Recipe,
    get_recipe,
    known_kinds,
    register_recipe,
    unregister_recipe,
)
from recipes.config import RecipeConfig

__all__ = [
    "RECIPES",
    "ConversionReport",
    "Recipe",
    "RecipeConfig",
    "get_recipe",
    "known_kinds",
    "register_recipe",
    "unregister_recipe",
]
