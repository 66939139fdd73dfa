"""The plain-precision recipe (kind ``recipe.quantizer: none``): fp32, bf16 or fp16 by
``recipe.precision``. Nothing is quantized below the engine dtype.

Numerics (all three run every GEMM through torch in the engine dtype):

* ``fp32``  parameters, activations, gradients, optimizer state: IEEE FP32.
  DeepSpeed runs without a mixed-precision wrapper.
* ``bf16``  DeepSpeed ``bf16`` mode: the module's parameters, activations and
  gradients are BF16 (8-bit exponent, 7-bit mantissa, round-to-nearest-even
  on every cast); FP32 master weights and AdamW state live in the optimizer
  wrapper (or ZeRO partitions); gradient reduction across ranks is done on the
  FP32 copies for ZeRO 1-3. No loss scaling (BF16 has FP32's range).
* ``fp16``  DeepSpeed ``fp16`` mode: FP16 parameters, activations and gradients
  (5-bit exponent: max 65504, smallest subnormal 2^-24), FP32 master weights,
  dynamic loss scaling: the loss is multiplied by 2^``initial_scale_power``,
  the scale is halved on an overflow step (which is skipped, after
  ``hysteresis`` consecutive overflows) and doubled after
  ``loss_scale_window`` clean steps, never below ``min_loss_scale``. A
  positive ``loss_scale`` fixes the scale instead. DeepSpeed refuses fp16 on
  its CPU accelerator, so lowbit rejects ``+recipe=fp16`` on CPU at validation.

Saturation: none is applied by lowbit; overflow in fp16 is detected by
DeepSpeed's loss scaler, BF16/FP32 overflow to Inf as IEEE specifies.
"""

from __future__ import annotations

from torch import nn

from recipes.base import Recipe, known_kinds, register_recipe
from recipes.config import ROLE_FORMAT_FIELDS, resolve_same
from recipes.errors import ConfigError


@register_recipe("none")
class PlainRecipe(Recipe):
    """Engine precision only; every Linear stays a plain ``nn.Linear``."""

    backends = ("native",)

    def check(self, model: nn.Module) -> None:
        """Refuse a set ``*_format`` or ``layer_formats``: under ``quantizer: none`` they would be
        silently ignored."""
        cfg = resolve_same(self.cfg)
        if cfg.layer_formats:
            raise ConfigError("recipe.layer_formats", dict(cfg.layer_formats), "quantizer none converts no layer; "
                              "set recipe.quantizer to a quantized kind or drop recipe.layer_formats")  # fmt: skip
        for key in ROLE_FORMAT_FIELDS:
            if getattr(cfg, key) is not None:
                kinds = ", ".join(k for k in known_kinds() if k != "none")
                raise ConfigError(
                    "recipe.quantizer",
                    "none",
                    f"quantizes nothing, but recipe.{key}={getattr(cfg, key)}; "
                    f"use one of: {kinds} (or set recipe.{key}=null)",
                )

    def grad_format(self) -> None:
        return None  # nothing below the engine dtype

    def gemm_family(self) -> str:
        return self.precision
