"""Model-independent validation of a quantized recipe's settings (``check_recipe_config``).

Every error is a ``recipes.errors.ConfigError`` naming the dotted key (``recipe.block_size``)
and the fix; the trainer prints it as one line before any start-up. What differs by
``recipe.quantizer`` is read from its entry in ``recipes.kinds.QUANTIZER_KINDS`` (element
family, blocks, tiles, Hadamard). The model-dependent checks (block size vs each converted
layer, ``check_layer_keys``) run in ``QuantizedRecipe.check`` in ``recipes.quantized``.
``layer_config`` is the one place ``recipe.layer_formats`` is applied to a layer.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from recipes.config import OPERAND_FIELDS, ROLE_FORMAT_FIELDS, RecipeConfig, resolve_same
from recipes.errors import ConfigError
from recipes.filter import compile_patterns
from recipes.fp8 import format_for_role
from recipes.kinds import QUANTIZER_KINDS, QuantizerKind
from recipes.mx import FORMATS, ROUNDINGS, SCALE_RULES
from recipes.mx.nvfp4 import NVFP4_ORDERS

__all__ = ["check_layer_keys", "check_recipe_config", "config_error", "layer_config", "layer_override",
           "quantizer_kind", "resolve_compile", "role_formats"]  # fmt: skip

#: role field -> the TE tensor role deciding its FP8 format (E5M2 for grad_output under HYBRID)
_TE_ROLES = dict(
    zip(
        ROLE_FORMAT_FIELDS,
        ("input", "weight", "grad_output", "weight", "input", "grad_output", "grad_output"),
    )
)


def role_formats(cfg: RecipeConfig) -> dict[str, str | None]:
    """The role formats (``ROLE_FORMAT_FIELDS``) with ``same`` resolved."""
    r = resolve_same(cfg)
    return {k: getattr(r, k) for k in ROLE_FORMAT_FIELDS}


def layer_override(cfg: RecipeConfig, name: str) -> tuple[str | None, dict[str, str | None]]:
    """The first ``recipe.layer_formats`` key matching layer ``name`` (the layer filter's match,
    ``recipes.filter.compile_patterns``) and its role-format override; ``(None, {})`` if none."""
    for pat, override in cfg.layer_formats.items():
        if compile_patterns([pat])[0].search(name):
            return pat, dict(override)
    return None, {}


def layer_config(cfg: RecipeConfig, name: str) -> RecipeConfig:
    """The settings converted Linear ``name`` quantizes with: ``cfg`` with its override's role
    fields replaced (``same`` still unresolved), or ``cfg`` itself where no key matches."""
    override = layer_override(cfg, name)[1]
    return _with_formats(cfg, override) if override else cfg


def _with_formats(cfg: RecipeConfig, override: dict[str, Any]) -> RecipeConfig:
    return dataclasses.replace(cfg, **override, layer_formats={})


def quantizer_kind(cfg: RecipeConfig) -> QuantizerKind:
    """The table entry of ``recipe.quantizer`` (ConfigError if the quantized recipe has none)."""
    kind = QUANTIZER_KINDS.get(cfg.quantizer)
    if kind is None:
        raise config_error("quantizer", cfg.quantizer, f"use one of {', '.join(QUANTIZER_KINDS)}")
    return kind


def _kinds_with(flag: str) -> str:
    return " and ".join(k for k, v in QUANTIZER_KINDS.items() if getattr(v, flag))


def resolve_compile(value: str, device: str | None) -> bool:
    v = str(value).lower()
    return device == "cuda" if v == "auto" else v == "true"


def config_error(key: str, value: object, fix: str) -> ConfigError:
    return ConfigError(f"recipe.{key}", value, fix)


def _check_formats(cfg: RecipeConfig, kind: QuantizerKind) -> None:
    """Each role's format is one of the kind's (the rule for the recipe and for each layer override)."""
    for key, fmt in role_formats(cfg).items():
        if fmt is None:
            continue
        if kind.family == "mx" and fmt not in FORMATS:
            raise config_error(
                key, fmt, f"unknown MX element format; use one of {', '.join(FORMATS)} or null"
            )
        if kind.family == "nvfp4" and fmt != "fp4_e2m1":
            raise config_error(key, fmt, "NVFP4 elements are fp4_e2m1 (or null for high precision)")
        if kind.family == "fp8":
            want = format_for_role(cfg.fp8_format, _TE_ROLES[key]).element
            if fmt != want:
                raise config_error(
                    key,
                    fmt,
                    f"recipe.fp8_format={cfg.fp8_format} gives {want} for this role; set {want} or null",
                )


def _show(pat: str, override: object) -> str:
    return f"{{{pat}: {override}}}"


def _check_layer_formats(cfg: RecipeConfig, kind: QuantizerKind) -> None:
    """``recipe.layer_formats``: regex keys, role-field value keys, formats valid for the kind."""
    for pat, override in cfg.layer_formats.items():
        try:
            compile_patterns([pat])
        except re.error as e:
            raise config_error("layer_formats", pat, f"key not a valid regex ({e})") from None
        shown = _show(pat, override)
        if bad := [k for k in override if k not in ROLE_FORMAT_FIELDS]:
            raise config_error("layer_formats", shown, f"{bad[0]} is not a role format field; "
                               f"map some of {', '.join(ROLE_FORMAT_FIELDS)} to formats")  # fmt: skip
        try:  # the recipe's own per-field rule, on the layer's merged settings
            _check_formats(_with_formats(cfg, override), kind)
        except ConfigError as e:
            raise config_error("layer_formats", shown, f"for the layers it matches {e}") from None


def check_layer_keys(cfg: RecipeConfig, converted: Sequence[str], kept: Sequence[str]) -> None:
    """Every ``recipe.layer_formats`` key is the first to match some converted Linear: a typo, a
    key matching only kept layers, or one shadowed by earlier keys would be silently ignored."""
    used = {layer_override(cfg, name)[0] for name in converted}
    some = ", ".join(converted[:4]) + (", ..." if len(converted) > 4 else "")
    for pat in (p for p in cfg.layer_formats if p not in used):
        match = compile_patterns([pat])[0].search
        if any(match(n) for n in converted):
            why = "every converted layer it matches takes an earlier key's override (the first match applies)"
        elif hit := [n for n in kept if match(n)]:
            why = (f"it matches only layers kept in high precision ({', '.join(hit)}), which it does not "
                   f"convert; converted layers are named like {some or '(none)'}")  # fmt: skip
        else:
            why = f"it matches no converted Linear layer; they are named like {some or '(none)'}"
        raise config_error("layer_formats", pat, why)


def _check_numbers(cfg: RecipeConfig, kind: QuantizerKind) -> None:
    resolved = resolve_same(cfg)
    for key in ("rounding", "grad_rounding"):
        val = getattr(resolved, key)
        if val not in ROUNDINGS:
            raise config_error(
                key,
                val,
                f"use one of {', '.join(ROUNDINGS)}" + (" or same" if key == "grad_rounding" else ""),
            )
        if kind.family == "fp8" and val != "nearest_even":
            raise config_error(key, val, "FP8 casts round to nearest-even only; use nearest_even")
    if cfg.scale_rule not in SCALE_RULES:
        raise config_error("scale_rule", cfg.scale_rule, f"use one of {', '.join(SCALE_RULES)}")
    if cfg.fp8_format.upper() not in ("E4M3", "HYBRID"):
        raise config_error("fp8_format", cfg.fp8_format, "use E4M3 or HYBRID")
    if cfg.amax_history_len < 1:
        raise config_error("amax_history_len", cfg.amax_history_len, "must be >= 1")
    if cfg.amax_update not in ("step", "microbatch"):
        raise config_error(
            "amax_update", cfg.amax_update, "use step (once per optimizer step) or microbatch (TE)"
        )
    if cfg.amax_update != "step" and not kind.delayed:
        raise config_error(
            "amax_update", cfg.amax_update, f"only delayed scaling keeps amax histories; quantizer {cfg.quantizer} "
            "computes its scales from the tensor itself (leave recipe.amax_update=step)",
        )  # fmt: skip
    if cfg.amax_compute_algo not in ("max", "most_recent"):
        raise config_error("amax_compute_algo", cfg.amax_compute_algo, "use max or most_recent")
    if cfg.margin < 0:
        raise config_error("margin", cfg.margin, "must be >= 0")
    if cfg.amax_epsilon < 0:
        raise config_error("amax_epsilon", cfg.amax_epsilon, "must be >= 0")
    if cfg.emulated_gemm not in ("auto", "codes", "bf16", "fp32"):
        raise config_error("emulated_gemm", cfg.emulated_gemm, "use auto, codes, bf16 (where exact) or fp32")
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
    if cfg.weight_2d_blocks and not kind.tiles:
        raise config_error(
            "weight_2d_blocks", True, f"2-D weight tiles exist for quantizer {_kinds_with('tiles')} only"
        )
    if cfg.nvfp4_scale_order not in NVFP4_ORDERS:
        raise config_error(
            "nvfp4_scale_order", cfg.nvfp4_scale_order, f"use one of {', '.join(NVFP4_ORDERS)}"
        )
    if cfg.nvfp4_scale_order != "te" and kind.family != "nvfp4":
        raise config_error("nvfp4_scale_order", cfg.nvfp4_scale_order,
                           f"only NVFP4 has two scale orders; quantizer {cfg.quantizer} would ignore it")  # fmt: skip
    if cfg.wgrad_hadamard and not kind.hadamard:
        raise config_error(
            "wgrad_hadamard",
            True,
            f"the wgrad Hadamard transform is part of the {_kinds_with('hadamard')} quantizer only",
        )


def _check_block_size(cfg: RecipeConfig, kind: QuantizerKind) -> None:
    b = cfg.block_size
    if not kind.blocked:
        if b != 0:
            raise config_error(
                "block_size", b, f"quantizer {cfg.quantizer} has no blocks; set recipe.block_size=0"
            )
        return
    if not (2 <= b <= 256 and b & (b - 1) == 0):
        raise config_error(
            "block_size", b, "must be a power of two from 2 to 256 (MX: 32, NVFP4: 16, FP8 block: 128)"
        )
    if kind.block_size and b != kind.block_size:
        n, q = kind.block_size, cfg.quantizer.upper()
        raise config_error("block_size", b, f"{q} blocks are {n} elements; set recipe.block_size={n}")


def check_recipe_config(cfg: RecipeConfig) -> None:
    """Model-independent checks of a quantized recipe's settings (ConfigError on failure)."""
    if cfg.backend not in ("auto", "emulated", "torch", "te"):
        raise config_error(
            "backend", cfg.backend, "a quantized recipe runs on auto, emulated, torch (real FP8 GEMMs) or te"
        )
    kind = quantizer_kind(cfg)
    _check_numbers(cfg, kind)
    formats = role_formats(cfg)
    if all(formats[k] is None for gemm in OPERAND_FIELDS.values() for k in gemm):
        raise config_error(
            "input_format", None, f"recipe {cfg.name} quantizes nothing: set at least one *_format"
        )
    _check_formats(cfg, kind)
    _check_layer_formats(cfg, kind)
    _check_block_size(cfg, kind)
    f = role_formats(cfg)
    if cfg.quantize_attention and f["grad_output_dgrad_format"] != f["grad_output_wgrad_format"]:
        raise config_error(
            "grad_output_wgrad_format",
            f["grad_output_wgrad_format"],
            "the attention matmuls quantize dS and dO once for both of their backward GEMMs; set it equal "
            f"to grad_output_dgrad_format ({f['grad_output_dgrad_format']}) or recipe.quantize_attention=false",
        )


def check_block_dims(cfg: RecipeConfig, converted: dict[str, nn.Linear]) -> None:
    """The block size divides every converted layer's reduction dims (K for the forward, N for
    dgrad) where that GEMM quantizes something (in the layer's formats, ``layer_config``); wgrad
    reduces over tokens (padded)."""
    for name, lin in converted.items():
        f = role_formats(layer_config(cfg, name))
        fwd = f["input_format"] is not None or f["weight_format"] is not None
        dgrad = f["grad_output_dgrad_format"] is not None or f["weight_dgrad_format"] is not None
        for on, dim, what in (
            (fwd, lin.in_features, "in_features"),
            (dgrad, lin.out_features, "out_features"),
        ):
            if on and dim % cfg.block_size:
                raise config_error(
                    "block_size",
                    cfg.block_size,
                    f"must divide every converted layer's reduction dims, but {name}.{what}={dim}; "
                    f"choose a block size dividing it, or keep {name} in high precision via recipe.skip_modules",
                )


def padded_wgrad(cfg: RecipeConfig, converted: list[str], tokens: int) -> dict[str, str]:
    """The wgrad GEMMs of ``converted`` layers that zero-pad their reduction dim (tokens per
    micro-batch) to whole blocks: blocked kinds whose wgrad quantizes an operand along tokens.
    Padding never raises a block's amax; it is reported, not refused (TE pads too)."""
    b = cfg.block_size
    if not (quantizer_kind(cfg).blocked and b and tokens % b):
        return {}
    note = f"tokens {tokens} -> {tokens + (-tokens) % b} (block {b})"
    wgrad = {name: role_formats(layer_config(cfg, name)) for name in converted}
    return {f"{n}.wgrad": note for n, f in wgrad.items()
            if f["grad_output_wgrad_format"] is not None or f["input_wgrad_format"] is not None}  # fmt: skip
