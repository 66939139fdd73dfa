"""Peers' twins of lowbit's FP8 recipes, for the parity harness (``python -m train.parity``).

torchao's ``Float8Linear`` (``torchao.float8.convert_to_float8_training``) is an independent FP8
training implementation. Its twin of each lowbit kind, and what differs:

=================  ====================  ==============================================================
lowbit kind        torchao recipe        semantics that differ (named in the parity table)
=================  ====================  ==============================================================
``fp8_current``    ``tensorwise``        scale ``fp8_max / amax`` computed in FP64, then rounded to FP32
                                         (lowbit and TE divide in FP32); dY always E5M2
``fp8_delayed``    ``tensorwise``        torchao has no delayed scaling: current scales stand in
``fp8_rowwise``    ``rowwise``           power-of-two scales, amax floor 1e-12 (as lowbit's preset)
=================  ====================  ==============================================================

Other kinds have no torchao twin (a ConfigError). :func:`probe_codes` casts one tensor pair the
way lowbit's roles and torchao's casts do and reports the fraction of equal FP8 codes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from recipes.base import get_recipe
from recipes.config import RecipeConfig
from recipes.errors import ConfigError

__all__ = ["TORCHAO_TWINS", "convert_torchao", "probe_codes", "recipe_notes"]

#: lowbit kind -> torchao ``Float8LinearConfig.from_recipe_name`` recipe
TORCHAO_TWINS = {"fp8_current": "tensorwise", "fp8_delayed": "tensorwise", "fp8_rowwise": "rowwise"}
#: kinds whose scale rule torchao's twin shares, so their FP8 codes are compared
SAME_SCALE_RULE = ("fp8_current", "fp8_rowwise")


def _twin(cfg: RecipeConfig) -> str:
    if cfg.quantizer not in TORCHAO_TWINS:
        raise ConfigError("recipe.quantizer", cfg.quantizer,
                          f"torchao's Float8Linear has twins of {', '.join(TORCHAO_TWINS)} only")  # fmt: skip
    return TORCHAO_TWINS[cfg.quantizer]


def convert_torchao(model: nn.Module, cfg: RecipeConfig, converted: list[str]) -> tuple[str, list[str]]:
    """Swap ``converted`` Linear layers for torchao's Float8Linear; (GEMM label, semantic notes)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    name = _twin(cfg)
    config = Float8LinearConfig.from_recipe_name(name)
    keep = set(converted)
    convert_to_float8_training(model, config=config, module_filter_fn=lambda _m, fqn: fqn in keep)
    notes = [f"torchao {name}: dynamic scales, fp8_max/amax in FP64 then rounded to FP32"]
    if cfg.quantizer == "fp8_delayed":
        notes.append("torchao has no delayed scaling: current (dynamic) scales stand in")
    if name == "tensorwise" and cfg.fp8_format.upper() == "E4M3":
        notes.append("torchao tensorwise casts dY to E5M2 (lowbit: E4M3 under fp8_format=E4M3)")
    if name == "rowwise":
        notes.append(f"torchao rowwise: power-of-two scales={config.round_scales_to_power_of_2}")
    return f"torchao Float8Linear ({name})", notes


def recipe_notes(cfg: RecipeConfig, backend: str) -> list[str]:
    """What a lowbit backend does differently from the emulated recipe, for the parity table."""
    notes = []
    if cfg.quantizer == "fp8_delayed":
        notes.append(f"delayed scales updated per {cfg.amax_update}")
    if backend == "torch":
        notes.append("scale applied to the accumulator (emulation: to the operands)")
    return notes


def probe_codes(cfg: RecipeConfig, x: torch.Tensor, w: torch.Tensor, *, layer: str,
                torchao: bool) -> dict[str, tuple[float, float]]:  # fmt: skip
    """Fractions of the FP8 codes of ``x`` ([tokens, K]) and ``w`` ([N, K]) that equal lowbit's cast,
    per implementation: lowbit's emulated and torch backends cast with the same role objects (1.0 by
    construction; ``tests/test_torch_backend.py`` checks the bits); torchao with its own cast."""
    from recipes.quantized import QuantizedRecipe

    rec = get_recipe(dataclasses.replace(cfg, backend="emulated"))
    assert isinstance(rec, QuantizedRecipe)
    rec.resolve(x.device.type)
    qs = rec.linear_quantizers(layer)
    if not (qs.input is not None and qs.input.castable and qs.weight is not None and qs.weight.castable):
        return {}
    ours = (qs.input.cast(x, axis=-1, training=False).q, qs.weight.cast(w, axis=-1, training=False).q)
    out = {"emulated": (1.0, 1.0), "torch": (1.0, 1.0)}
    if (
        torchao and cfg.quantizer in SAME_SCALE_RULE
    ):  # delayed scales are not torchao's: no code match expected
        theirs = _torchao_codes(cfg, x, w)
        fx, fw = (
            float((a.view(torch.uint8) == b.view(torch.uint8)).float().mean()) for a, b in zip(ours, theirs)
        )
        out["torchao"] = (fx, fw)
    return out


def _torchao_codes(cfg: RecipeConfig, x: torch.Tensor, w: torch.Tensor) -> tuple[Any, Any]:
    from torchao.float8.config import ScalingGranularity
    from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import GemmInputRole, LinearMMConfig

    rowwise = _twin(cfg) == "rowwise"
    kw: dict[str, Any] = {
        "scaling_granularity": ScalingGranularity.AXISWISE if rowwise else ScalingGranularity.TENSORWISE,
        "axiswise_dim": -1 if rowwise else None,
        "round_scales_to_power_of_2": rowwise,
    }
    e4m3 = torch.float8_e4m3fn
    tx = hp_tensor_to_float8_dynamic(x, e4m3, LinearMMConfig(), **kw)._data
    tw = hp_tensor_to_float8_dynamic(
        w, e4m3, LinearMMConfig(), gemm_input_role=GemmInputRole.WEIGHT, **kw
    )._data
    return tx, tw
