"""Which implementation runs a quantized recipe's GEMMs: ``recipe.backend`` = auto | te | torch | emulated.

* ``emulated`` (any device): fake quantization, FP32 GEMMs on the dequantized operands
  (``recipes.qlinear``).
* ``torch``: real FP8 GEMMs through torch's scaled matmul (``recipes.scaled_linear``) for the
  per-tensor and rowwise FP8 kinds, on the CPU and on CUDA GPUs with FP8 tensor cores; what the
  device's scaled matmul accepts is probed (``recipes.fp8.gemm.features``).
* ``te``: Transformer Engine modules under TE's autocast with a recipe object built from the
  config (``recipes.te_backend``); CUDA with TE installed.
* ``auto``: ``te`` if it can run the recipe here, else ``torch`` on a CUDA GPU whose scaled matmul
  takes the recipe, else ``emulated`` (the CPU's scaled matmul is a correctness path, not a fast
  one, so ``auto`` never picks it there). The choice is printed once and recorded as
  ``resolved.recipe.resolved_backend``, with ``resolved.recipe.gemm_impl`` naming the GEMM.

A backend asked for explicitly that cannot run is a ``ConfigError`` on ``recipe.backend`` naming
the requirement and the alternative, raised in validation, before any start-up. Per-layer role
formats (``recipe.layer_formats``) are emulated-only: ``auto`` resolves to ``emulated`` with them,
and ``te`` / ``torch`` asked for with them is a ``ConfigError`` on ``recipe.layer_formats``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from recipes.config import RecipeConfig
from recipes.errors import ConfigError
from recipes.fp8.gemm import features, unsupported_reason
from recipes.quantized_checks import quantizer_kind, role_formats

__all__ = ["TORCH_KINDS", "TEModules", "gemm_impl", "resolve", "te_problem", "torch_problem"]

#: kinds whose scales the torch backend passes to the scaled matmul today
TORCH_KINDS = ("fp8_current", "fp8_delayed", "fp8_rowwise")
#: why the hardware backends cannot run a recipe with per-layer role formats
LAYER_FORMATS_PROBLEM = "recipe.layer_formats is emulated-only"
#: the per-GEMM fast-accumulation fields and their defaults (torchao's): only backend=torch has them
FAST_ACCUM_DEFAULTS = {"fast_accum_forward": True, "fast_accum_dgrad": False, "fast_accum_wgrad": False}


def torch_problem(cfg: RecipeConfig, device: str) -> str | None:
    """Why ``recipe.backend=torch`` cannot run ``cfg`` on ``device`` (None: it can)."""
    kind = quantizer_kind(cfg)
    if cfg.layer_formats:
        return LAYER_FORMATS_PROBLEM
    if cfg.quantizer == "fp8_block":
        return unsupported_reason(device, block=True)
    if kind.family == "mx":
        fmts = {f for f in role_formats(cfg).values() if f is not None}
        if fmts - {"fp8_e4m3", "fp8_e5m2"}:
            return f"torch's scaled matmul has FP8 GEMMs only, not {', '.join(sorted(fmts))}"
        return unsupported_reason(device, mx=True)
    if cfg.quantizer not in TORCH_KINDS:
        return f"torch's scaled matmul has no {cfg.quantizer} GEMM (kinds: {', '.join(TORCH_KINDS)})"
    null = [k for k, v in role_formats(cfg).items() if v is None]
    if null:
        return f"it runs every converted GEMM in FP8, but recipe.{null[0]}=null keeps that operand in high precision"
    if cfg.quantize_attention:
        return "the attention matmuls (recipe.quantize_attention=true) are not run through the scaled matmul"
    return unsupported_reason(
        device, rowwise=cfg.quantizer == "fp8_rowwise", e5m2_first=cfg.fp8_format.upper() == "HYBRID"
    )


def te_problem(cfg: RecipeConfig, device: str) -> str | None:
    """Why ``recipe.backend=te`` cannot run ``cfg`` on ``device`` (None: it can): first what TE's
    recipes cannot express, then what this machine lacks."""
    from recipes.te_backend import te_recipe_spec, te_unavailable_reason

    if cfg.layer_formats:
        return LAYER_FORMATS_PROBLEM
    try:
        te_recipe_spec(cfg)
    except ConfigError as e:
        return f"Transformer Engine cannot express {e.key}={e.value}: {e.fix}"
    return te_unavailable_reason(device, quantizer=cfg.quantizer)


def resolve(cfg: RecipeConfig, device: str) -> tuple[str, str | None]:
    """(backend, note printed once when ``auto`` chose). ConfigError for an explicit backend that
    cannot run here, and for backend-only options set under another backend."""
    want = cfg.backend
    if cfg.layer_formats and want in ("torch", "te"):
        raise ConfigError("recipe.layer_formats", dict(cfg.layer_formats),
                          f"{LAYER_FORMATS_PROBLEM} (not recipe.backend={want}); use recipe.backend=emulated")  # fmt: skip
    if want == "torch":
        if why := torch_problem(cfg, device):
            raise ConfigError("recipe.backend", "torch", f"{why}; use recipe.backend=emulated")
        chosen, note = "torch", None
    elif want == "te":
        if why := te_problem(cfg, device):
            raise ConfigError("recipe.backend", "te", why)  # the reason names the alternatives
        chosen, note = "te", None
    elif want == "emulated":
        chosen, note = "emulated", None
    else:  # auto
        dev_type = torch.device(device).type
        if te_problem(cfg, device) is None:
            chosen = "te"
        elif dev_type == "cuda" and torch_problem(cfg, device) is None:
            chosen = "torch"
        else:
            chosen = "emulated"
        why = "" if chosen != "emulated" else f" (no hardware backend for {cfg.name})"
        note = f"recipe.backend=auto resolved to '{chosen}' on {device}{why}"
    if chosen != "torch":
        for key, default in FAST_ACCUM_DEFAULTS.items():
            if getattr(cfg, key) != default:
                raise ConfigError(
                    f"recipe.{key}", getattr(cfg, key),
                    f"fast accumulation is a setting of the torch backend's scaled matmul; backend {chosen} "
                    f"accumulates in FP32 (set recipe.backend=torch, or leave it at {str(default).lower()})",
                )  # fmt: skip
    if chosen != "emulated" and cfg.emulated_gemm != "auto":
        raise ConfigError("recipe.emulated_gemm", cfg.emulated_gemm,
                          f"a setting of the emulated backend's GEMMs; backend {chosen} runs real low-precision "
                          "GEMMs (set recipe.backend=emulated, or leave it at auto)")  # fmt: skip
    return chosen, note


def gemm_impl(backend: str, cfg: RecipeConfig, device: str, *, emulated_gemm: str = "fp32") -> str:
    """What runs each converted GEMM, for ``resolved.recipe.gemm_impl`` and the parity table."""
    if backend == "emulated" and emulated_gemm != "fp32":
        exact = ("emulated: torch.mm on quantize-dequantized operands, in BF16 where both are exact in BF16 "
                 "(MX, power-of-two FP8 scales, high precision) and the engine is BF16")  # fmt: skip
        if emulated_gemm == "bf16":
            return exact + ", else FP32"
        return (
            exact
            + "; per-tensor FP8 and NVFP4 on their BF16 codes, scales applied to the FP32 output; else FP32"
        )
    if backend == "emulated":
        return "emulated: FP32 torch.mm on quantize-dequantized FP32 operands"
    if backend == "torch":
        f = features(device)
        scales = "rowwise" if cfg.quantizer == "fp8_rowwise" else "per-tensor"
        if torch.device(device).type == "cpu" and scales == "per-tensor":
            scales += " (passed as rows: the CPU's tensorwise kernel is a slow reference loop)"
        return f"{f.describe()}: real FP8 GEMMs, {scales} FP32 scales"
    if backend == "te":
        from recipes.te_backend import te_recipe_spec

        name, _ = te_recipe_spec(cfg)
        return f"transformer_engine {name}"
    return backend


@dataclass
class TEModules:
    """backend=te after conversion: the TE module namespace and the recipe object built from the
    config (``recipes.te_backend``; unverified until a GPU run with TE records it)."""

    te: Any
    recipe: Any
    name: str

    @classmethod
    def convert(cls, model: nn.Module, converted: list[str], cfg: RecipeConfig) -> TEModules:
        """Swap the converted Linear layers for TE modules (before ``deepspeed.initialize``)."""
        import transformer_engine.pytorch as te  # resolve() checked that it imports
        from transformer_engine.common import recipe as te_recipes

        from recipes.te_backend import build_te_recipe, plan_te_swap, swap_to_te, te_recipe_spec

        swap_to_te(model, plan_te_swap(model, converted, fuse_layernorm=cfg.te_fuse_layernorm), te)
        return cls(te, build_te_recipe(te_recipes, cfg), te_recipe_spec(cfg)[0])

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """TE's autocast with our recipe, amaxes reduced over the data-parallel (default) group."""
        import torch.distributed as dist

        from recipes.te_backend import te_autocast

        group = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
        return te_autocast(self.te, self.recipe, group)

    def describe(self) -> str:
        return f"transformer_engine {self.name}"
