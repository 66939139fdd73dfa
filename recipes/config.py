"""The one recipe schema.

Every ``conf/recipe/*.yaml`` fills this dataclass completely, so a
``+recipe=NAME`` merge over the inline BF16 default never inherits a stray
BF16 value. Fields a recipe does not use keep their neutral defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

PRECISIONS = ("fp32", "bf16", "fp16")
BACKENDS = ("auto", "native", "emulated", "te", "torch")


@dataclass
class RecipeConfig:
    name: str = "bf16"
    """Registry key of the recipe (``recipes.base.RECIPES``)."""
    backend: str = "auto"
    """auto | native | emulated | te | torch. ``auto`` resolves to the fastest
    backend the hardware has; the resolved value is printed and recorded."""
    precision: str = "bf16"
    """DeepSpeed engine precision: parameters, activations and gradients.
    Master weights and optimizer state are FP32 for bf16/fp16."""
    # fp16 dynamic loss scaling (DeepSpeed's ``fp16`` section); ignored otherwise.
    loss_scale: float = 0.0
    """0 selects dynamic loss scaling; a positive value is a static scale."""
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0
