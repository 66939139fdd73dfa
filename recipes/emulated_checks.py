"""Model-independent validation of an emulated recipe's settings (``check_recipe_config``).

Every error is a ``recipes.errors.ConfigError`` naming the dotted key (``recipe.block_size``)
and the fix; the trainer prints it as one line before any start-up. The
model-dependent check (block size vs each converted layer) is
``EmulatedRecipe.check`` in ``recipes.emulated``.
"""

from __future__ import annotations

import re

from recipes.config import QUANTIZERS, SAME, RecipeConfig
from recipes.errors import ConfigError
from recipes.fp8 import format_for_role
from recipes.mx import FORMATS, ROUNDINGS, SCALE_RULES

__all__ = ["BLOCKED_QUANTIZERS", "check_recipe_config", "config_error", "resolve_compile", "role_formats"]

BLOCKED_QUANTIZERS = ("mx", "nvfp4", "fp8_block")
_FP8_NAMES = {"e4m3": "fp8_e4m3", "e5m2": "fp8_e5m2"}
#: role field -> the TE tensor role deciding its FP8 format (E5M2 for grad_output under HYBRID)
_ROLE_FIELDS = {
    "input_format": "input",
    "weight_format": "weight",
    "grad_output_format": "grad_output",
    "weight_dgrad_format": "weight",
    "input_wgrad_format": "input",
}


def role_formats(cfg: RecipeConfig) -> dict[str, str | None]:
    """The five role formats with ``same`` resolved."""
    f = {k: getattr(cfg, k) for k in _ROLE_FIELDS}
    if f["weight_dgrad_format"] == SAME:
        f["weight_dgrad_format"] = cfg.weight_format
    if f["input_wgrad_format"] == SAME:
        f["input_wgrad_format"] = cfg.input_format
    return f


def resolve_compile(value: str, device: str | None) -> bool:
    v = str(value).lower()
    return device == "cuda" if v == "auto" else v == "true"


def config_error(key: str, value: object, fix: str) -> ConfigError:
    return ConfigError(f"recipe.{key}", value, fix)


def _check_formats(cfg: RecipeConfig) -> None:
    formats = role_formats(cfg)
    if all(v is None for v in formats.values()):
        raise config_error(
            "input_format", None, f"recipe {cfg.name} quantizes nothing: set at least one *_format"
        )
    for key, fmt in formats.items():
        if fmt is None:
            continue
        te_role = _ROLE_FIELDS[key]
        if cfg.quantizer == "mx" and fmt not in FORMATS:
            raise config_error(
                key, fmt, f"unknown MX element format; use one of {', '.join(FORMATS)} or null"
            )
        if cfg.quantizer == "nvfp4" and fmt != "fp4_e2m1":
            raise config_error(key, fmt, "NVFP4 elements are fp4_e2m1 (or null for high precision)")
        if cfg.quantizer.startswith("fp8_"):
            want = _FP8_NAMES[format_for_role(cfg.fp8_format, te_role).name]
            if fmt != want:
                raise config_error(
                    key,
                    fmt,
                    f"recipe.fp8_format={cfg.fp8_format} gives {want} for this role; set {want} or null",
                )


def _check_numbers(cfg: RecipeConfig) -> None:
    for key in ("rounding", "grad_rounding"):
        val = getattr(cfg, key)
        if key == "grad_rounding" and val == SAME:
            continue
        if val not in ROUNDINGS:
            raise config_error(
                key,
                val,
                f"use one of {', '.join(ROUNDINGS)}" + (" or same" if key == "grad_rounding" else ""),
            )
        if cfg.quantizer.startswith("fp8_") and val != "nearest_even":
            raise config_error(key, val, "FP8 casts round to nearest-even only; use nearest_even")
    if cfg.scale_rule not in SCALE_RULES:
        raise config_error("scale_rule", cfg.scale_rule, f"use one of {', '.join(SCALE_RULES)}")
    if cfg.fp8_format.upper() not in ("E4M3", "HYBRID"):
        raise config_error("fp8_format", cfg.fp8_format, "use E4M3 or HYBRID")
    if cfg.amax_history_len < 1:
        raise config_error("amax_history_len", cfg.amax_history_len, "must be >= 1")
    if cfg.amax_compute_algo not in ("max", "most_recent"):
        raise config_error("amax_compute_algo", cfg.amax_compute_algo, "use max or most_recent")
    if cfg.margin < 0:
        raise config_error("margin", cfg.margin, "must be >= 0")
    if cfg.amax_epsilon < 0:
        raise config_error("amax_epsilon", cfg.amax_epsilon, "must be >= 0")
    if str(cfg.compile).lower() not in ("auto", "true", "false"):
        raise config_error("compile", cfg.compile, "use auto (on for CUDA only), true or false")
    for key in ("keep_first_blocks", "keep_last_blocks"):
        if getattr(cfg, key) < 0:
            raise config_error(key, getattr(cfg, key), "must be >= 0")
    for pat in cfg.skip_modules:
        try:
            re.compile(pat)
        except re.error as e:
            raise config_error("skip_modules", pat, f"not a valid regex ({e})") from None
    if cfg.weight_2d_blocks and cfg.quantizer not in ("nvfp4", "fp8_block"):
        raise config_error(
            "weight_2d_blocks", True, "2-D weight tiles exist for quantizer nvfp4 and fp8_block only"
        )
    if cfg.wgrad_hadamard and cfg.quantizer != "nvfp4":
        raise config_error(
            "wgrad_hadamard", True, "the wgrad Hadamard transform is part of the nvfp4 quantizer only"
        )


def _check_block_size(cfg: RecipeConfig) -> None:
    b = cfg.block_size
    if cfg.quantizer not in BLOCKED_QUANTIZERS:
        if b != 0:
            raise config_error(
                "block_size", b, f"quantizer {cfg.quantizer} has no blocks; set recipe.block_size=0"
            )
        return
    if not (2 <= b <= 256 and b & (b - 1) == 0):
        raise config_error(
            "block_size", b, "must be a power of two from 2 to 256 (MX: 32, NVFP4: 16, FP8 block: 128)"
        )
    if cfg.quantizer == "nvfp4" and b != 16:
        raise config_error("block_size", b, "NVFP4 blocks are 16 elements; set recipe.block_size=16")


def check_recipe_config(cfg: RecipeConfig) -> None:
    """Model-independent checks of an emulated recipe's settings (ConfigError on failure)."""
    if cfg.backend not in ("auto", "emulated"):
        raise config_error(
            "backend",
            cfg.backend,
            "not implemented in this version: hardware backends (te, torch) need CUDA + transformer_engine "
            "or torchao kernels; use recipe.backend=emulated (or auto)",
        )
    if cfg.quantizer not in QUANTIZERS or cfg.quantizer == "none":
        raise config_error("quantizer", cfg.quantizer, f"use one of {', '.join(QUANTIZERS[1:])}")
    _check_numbers(cfg)
    _check_formats(cfg)
    _check_block_size(cfg)
