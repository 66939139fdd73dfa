"""lowbit's numerics package: precision recipes and the number formats they use.

A *recipe* decides how a model trains numerically: the DeepSpeed engine's
precision (fp32 / bf16 / fp16) and, for low-precision recipes, which GEMM
operands are quantized to which format. Recipes are looked up by name in a
registry (``recipes.base.get_recipe``); the trainer never branches on a
recipe's name.

Sub-packages:
  recipes.mx    OCP Microscaling formats: pure quantize/dequantize functions.
"""

from recipes.base import RECIPES, ConversionReport, Recipe, get_recipe, register_recipe
from recipes.config import RecipeConfig

__all__ = ["RECIPES", "ConversionReport", "Recipe", "RecipeConfig", "get_recipe", "register_recipe"]
