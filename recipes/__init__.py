"""lowbit's numerics package: precision recipes and the number formats they use.

A *recipe* decides how a model trains numerically: the DeepSpeed engine's
precision (fp32 / bf16 / fp16) and, for low-precision recipes, which GEMM
operands are quantized to which format. Recipes are looked up by name in a
registry (``recipes.base.get_recipe``); the trainer never branches on a
recipe's name.

Modules:
  recipes.base        protocol, registry, conversion report
  recipes.config      the one RecipeConfig schema
  recipes.precision   fp32 / bf16 / fp16 (engine precision only)
  recipes.emulated    MX / NVFP4 / FP8 recipes emulated on any device
  recipes.qlinear     the quantized Linear (autograd per GEMM role) and attention matmuls
  recipes.quantizers  per-role quantizers (MX, NVFP4, FP8 delayed/current/rowwise/block)
  recipes.filter      which Linear layers convert
  recipes.mx          OCP Microscaling formats: pure quantize/dequantize/encode functions
  recipes.fp8         FP8 formats and scaling (TE DelayedScaling emulation, current, block)
"""

from recipes.base import RECIPES, ConversionReport, Recipe, get_recipe, register_recipe
from recipes.config import RecipeConfig

__all__ = ["RECIPES", "ConversionReport", "Recipe", "RecipeConfig", "get_recipe", "register_recipe"]
