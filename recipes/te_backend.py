"""``recipe.backend=te``: the quantized kinds on NVIDIA Transformer Engine (TE) modules.

Numerics
--------
Converted layers (the emulated twin's ``recipes.filter`` decision) become ``te.Linear``; with
``recipe.te_fuse_layernorm`` a block's ``norm1 -> attn.qkv`` becomes ``te.LayerNormLinear`` and
``norm2 -> mlp.fc -> act -> mlp.proj`` ``te.LayerNormMLP``. Under ``te_autocast`` each TE GEMM
quantizes x and W (forward), dY and W (dgrad), x and dY (wgrad):

* ``DelayedScaling`` (fp8_delayed): per-tensor FP32 scale ``(fp8_max / amax) / 2^margin``, amax the
  max (or most recent) of an ``amax_history_len`` window of earlier iterations, MAX-reduced over
  ``amax_reduction_group``; ``Float8CurrentScaling`` (fp8_current): ``fp8_max / amax(x)``.
* ``Float8BlockScaling`` (fp8_block): 1x128 blocks of x and dY along the reduction dim, 128x128
  weight tiles (``w_block_scaling_dim=2``; 1x128 with ``=1``), power-of-2 FP32 scales.
* ``MXFP8BlockScaling`` (mx): 1x32 blocks, E8M0 scale ``cvt.rp(amax * (1/fp8_max))`` (round-up).
* ``NVFP4BlockScaling`` (nvfp4): E2M1, 16-element E4M3 block scales times an FP32 tensor scale,
  16x16 weight tiles, stochastic rounding of dY, random 16x16 Hadamard on both wgrad operands.

FP8 elements: E4M3 for x and W, E4M3 or (``HYBRID``) E5M2 for dY; casts round to nearest-even and
saturate. Block kinds quantize the rowwise and the columnwise copy each from the BF16 tensor. GEMMs
accumulate in FP32 and write BF16 (bias in the epilogue); TE fixes the accumulation per recipe:
fast (Hopper) fprop and split dgrad/wgrad for the per-tensor recipes (TE's ``_2X_ACC_*``; MXFP8 and
NVFP4 pass the same flags), split everywhere for block scaling. High precision: embeddings, norms
(fused: FP32 inside TE's kernel), attention (SDPA), softmax, residual adds, ``lm_head`` (skipped),
the loss, the optimizer. Differences from lowbit's emulated twin of the same recipe:

* **Scale cadence** (delayed): TE rolls histories and updates scales at every autocast exit and
  backward end, i.e. per micro-batch (hence ``recipe.amax_update=microbatch``).
* TE keeps ``scale_inv = 1/scale`` and dequantizes by multiplying; the emulation divides (<= 1 ulp).
* **Fused casts**: amax, cast and transpose come from one kernel; fused modules cast the FP32 norm
  output / activation straight to the low-precision format (the emulation rounds to BF16 first).
* MXFP8 multiplies amax by the FP32 reciprocal of fp8_max before rounding up (emulated ``rceil``
  divides): the exponent can differ where ``amax / fp8_max`` sits at a power of two.
* NVFP4: TE's Hadamard signs and SR stream differ; the per-tensor recipes' fast fprop accumulation
  is not emulated (exact FP32 there).

Traps: TE's recipe defaults read ``NVTE_*`` environment variables at import (FP32 block scales,
current-scaling power-of-2, backward override, NVFP4 options): ``build_te_recipe`` checks the built
object. ZeRO offload with TE is unverified upstream, ``te.Linear(bias=False)`` under ZeRO-3
``zero.Init`` is DeepSpeed #4095, ``torch.utils.checkpoint`` recomputes TE modules outside the
autocast (``te_parallel_problem``); dims: ``check_te_dims``. Checkpoints: TE modules carry
``<module>._extra_state`` (scaling state, delayed histories), which DeepSpeed's module state dict
saves with the weights; it is TE-version fragile (TE#1623), and fused modules rename parameters
(``mlp.fc.weight`` -> ``mlp.fc1_weight``): checkpoints do not move between backends.

RecipeConfig under ``backend=te`` (``te_recipe_spec``; refused = ConfigError, fix: emulated):

=====================================  ==========================================================
quantizer                              the five above map; others (fp8_rowwise, none) refused
``*_format``                           all set, backward copies = forward; mx: fp8_e4m3 x/W and
                                       fp8_e4m3 (E4M3) or fp8_e5m2 (HYBRID) dY; else refused
block_size                             fp8_block 128, mx 32, nvfp4 16, per-tensor 0
rounding / grad_rounding               nearest_even; nvfp4 dY stochastic -> TE's SR on, else off
scale_rule                             mx: rceil only (TE's round-up); not read by other kinds
weight_2d_blocks / wgrad_hadamard      fp8_block ``w_block_scaling_dim`` 2/1; nvfp4 ``disable_*``
fp8_format                             fp8_*: ``Format``; mx: from the role formats
margin, amax_history_len, amax_*      fp8_delayed: passed, amax_update microbatch only; else not read
power_2_scales / amax_epsilon          fp8_block: true / 0; fp8_delayed, fp8_current: false / 0
                                       (TE takes them from environment variables only)
quantize_attention, compile=true       refused (SDPA attention; no lowbit quantizer runs)
fast_accum_*                           defaults only (TE's accumulation is fixed, see above)
precision; loss scaling; skip/keep     engine and params_dtype; DeepSpeed; the converted list
te_fuse_layernorm / te_allow_offload   ``plan_te_swap`` / ``te_parallel_problem``
=====================================  ==========================================================

Read against TE v2.3 (oldest supported), v2.8 (NVFP4) and main d0067d0d (2.20.0.dev0). The GPU
part (``swap_to_te``, ``te_autocast``, ``te_model_init``, ``build_te_recipe``) is unverified until a
GPU run with TE records it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from recipes.config import RecipeConfig, resolve_same
from recipes.errors import ConfigError
from recipes.quantized_checks import check_recipe_config, config_error, role_formats

__all__ = ["TESwap", "TE_RECIPES", "build_te_recipe", "check_te_dims", "plan_te_swap", "swap_to_te",
           "te_autocast", "te_capability_reason", "te_model_init", "te_parallel_problem", "te_recipe_spec",
           "te_unavailable_reason"]  # fmt: skip

#: our ``recipe.quantizer`` -> TE recipe class
TE_RECIPES = {"fp8_delayed": "DelayedScaling", "fp8_current": "Float8CurrentScaling",
              "fp8_block": "Float8BlockScaling", "mx": "MXFP8BlockScaling", "nvfp4": "NVFP4BlockScaling"}  # fmt: skip
_EMULATED = "use recipe.backend=emulated"
_ALT = "use recipe.backend=torch on an FP8 GPU, or recipe.backend=emulated"
#: the fast-accumulation fields' defaults, the only values TE's fixed accumulation admits
_FAST_ACCUM = {"fast_accum_forward": True, "fast_accum_dgrad": False, "fast_accum_wgrad": False}
#: kind -> (min compute capability, min CUDA, TE's name for it) (TE's ``check_*_support``)
_NEEDS = {"fp8_block": ((9, 0), (12, 9), "FP8 block scaling"), "mx": ((10, 0), None, "MXFP8"),
          "nvfp4": ((10, 0), None, "NVFP4")}  # fmt: skip
#: kind -> (feature, token) multiples: ``assert_dim_for_fp8_exec``, then MXFP8 / NVFP4 1-D blocks
_MULTIPLES = {"mx": (32, 32), "nvfp4": (16, 16)}


def _refuse(key: str, value: object, why: str, fix: str = "") -> ConfigError:
    return config_error(key, value, f"{why}; {fix + ', or ' if fix else ''}{_EMULATED}")


def te_recipe_spec(cfg: RecipeConfig) -> tuple[str, dict[str, Any]]:
    """(TE recipe class name, constructor kwargs) built from ``cfg``, ``Format`` members by name;
    ConfigError for anything TE cannot express (the table of the module docstring)."""
    q = cfg.quantizer
    if q not in TE_RECIPES:
        why = "TE has no rowwise recipe" if q == "fp8_rowwise" else f"TE maps {', '.join(TE_RECIPES)}"
        raise _refuse("quantizer", q, why)
    check_recipe_config(dataclasses.replace(cfg, backend="emulated"))  # the backend-free rules
    _check_common(cfg)
    off = {"fp8_dpa": False, "fp8_mha": False}
    if q == "mx":
        return "MXFP8BlockScaling", {"fp8_format": _mx_format(cfg), **off}
    if q == "nvfp4":
        sr = resolve_same(cfg).grad_rounding == "stochastic"
        return "NVFP4BlockScaling", {"fp4_format": "E2M1", "disable_rht": not cfg.wgrad_hadamard,
                                     "disable_stochastic_rounding": not sr,
                                     "disable_2d_quantization": not cfg.weight_2d_blocks, **off}  # fmt: skip
    fmt = cfg.fp8_format.upper()
    if cfg.amax_epsilon != 0:
        raise _refuse("amax_epsilon", cfg.amax_epsilon, "TE's FP8 recipes fix the amax floor at 0.0")
    if q == "fp8_block":
        if cfg.block_size != 128:
            raise _refuse("block_size", cfg.block_size, "TE's FP8 blocks are 128 elements", "set it to 128")
        if not cfg.power_2_scales:
            raise _refuse("power_2_scales", False, "TE's FP32 block scales come only from the environment "
                          "(NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1)", "set recipe.power_2_scales=true")  # fmt: skip
        dims = {"x_block_scaling_dim": 1, "w_block_scaling_dim": 2 if cfg.weight_2d_blocks else 1,
                "grad_block_scaling_dim": 1}  # fmt: skip
        return "Float8BlockScaling", {"fp8_format": fmt, **dims, **off}
    if cfg.power_2_scales:
        raise _refuse("power_2_scales", True, f"TE's {TE_RECIPES[q]} takes power-of-2 scales only from the "
                      "environment (NVTE_FP8_CURRENT_SCALING_POWER_2_SCALES=1, current scaling)")  # fmt: skip
    if q == "fp8_current":
        return "Float8CurrentScaling", {"fp8_format": fmt, **off}
    if cfg.amax_update != "microbatch":
        raise config_error("amax_update", cfg.amax_update,
                           "TE updates scales once per micro-batch; set recipe.amax_update=microbatch")  # fmt: skip
    return "DelayedScaling", {"fp8_format": fmt, "margin": cfg.margin, "amax_history_len": cfg.amax_history_len,
                              "amax_compute_algo": cfg.amax_compute_algo, "reduce_amax": True, **off}  # fmt: skip


def _check_common(cfg: RecipeConfig) -> None:
    """Rules every TE recipe shares: all operands quantized, RNE casts, no lowbit-only options."""
    f, resolved = role_formats(cfg), resolve_same(cfg)
    for key, fmt in f.items():
        if fmt is None:
            raise _refuse(key, None, "TE quantizes x, W and dY of every converted GEMM")
    for copy, fwd in (("weight_dgrad_format", "weight_format"), ("input_wgrad_format", "input_format"),
                      ("grad_output_dgrad_format", "grad_output_format"),
                      ("grad_output_wgrad_format", "grad_output_format")):  # fmt: skip
        if f[copy] != f[fwd]:
            raise _refuse(copy, f[copy], f"TE quantizes this backward copy as recipe.{fwd}={f[fwd]}")
    if cfg.rounding != "nearest_even":
        raise _refuse("rounding", cfg.rounding, "TE casts x and W round-to-nearest-even only")
    sr_ok = ("nearest_even", "stochastic") if cfg.quantizer == "nvfp4" else ("nearest_even",)
    if resolved.grad_rounding not in sr_ok:
        raise _refuse("grad_rounding", resolved.grad_rounding, "TE casts dY nearest-even (stochastic: NVFP4)")
    if cfg.quantize_attention:
        raise _refuse("quantize_attention", True, "the attention matmuls run in SDPA, not in TE")
    if str(cfg.compile).lower() == "true":
        raise config_error("compile", cfg.compile, "TE runs its own kernels; set it to auto or false")
    for key, default in _FAST_ACCUM.items():
        if (value := getattr(cfg, key)) != default:
            raise _refuse(key, value, "TE fixes the accumulation", f"set it {str(default).lower()}")


def _mx_format(cfg: RecipeConfig) -> str:
    f = role_formats(cfg)
    for key in ("input_format", "weight_format"):
        if f[key] != "fp8_e4m3":
            raise _refuse(key, f[key], "TE's MXFP8 has fp8_e4m3 x and W (no MX FP6/FP4/INT8/E5M2)")
    if f["grad_output_format"] not in ("fp8_e4m3", "fp8_e5m2"):
        raise _refuse("grad_output_format", f["grad_output_format"], "TE's MXFP8 dY is fp8_e4m3 or fp8_e5m2")
    if cfg.block_size != 32:
        raise _refuse("block_size", cfg.block_size, "TE's MXFP8 blocks are 32 elements", "set it to 32")
    if cfg.scale_rule != "rceil":
        raise _refuse("scale_rule", cfg.scale_rule, "TE's MXFP8 rounds E8M0 scales up", "set it to rceil")
    return "E4M3" if f["grad_output_format"] == "fp8_e4m3" else "HYBRID"


def build_te_recipe(te_recipe_module: Any, cfg: RecipeConfig) -> Any:
    """The TE recipe object (``te_recipe_module`` = ``transformer_engine.common.recipe``) of
    ``te_recipe_spec(cfg)``; ConfigError where an ``NVTE_*`` environment default overrode the config."""
    name, kwargs = te_recipe_spec(cfg)
    kw = {k: te_recipe_module.Format[v] if k.endswith("_format") else v for k, v in kwargs.items()}
    obj = getattr(te_recipe_module, name)(**kw)
    want: dict[str, Any] = {"backward_override": None, "row_scaled_activation": False, "nvfp4_4over6": "none"}
    for attr, value in want.items():
        if (got := getattr(obj, attr, value)) != value:
            raise ConfigError("recipe.backend", "te", f"TE's {name}.{attr}={got} (an NVTE_* environment "
                              f"variable) where lowbit needs {value}; unset the variable")  # fmt: skip
    for attr in ("fp8_quant_fwd_inp", "fp8_quant_fwd_weight", "fp8_quant_bwd_grad"):
        qp = getattr(obj, attr, None)  # class attributes, fixed from the environment at TE's import
        if qp is not None and (bool(qp.power_2_scale) != cfg.power_2_scales or qp.amax_epsilon != 0):
            raise ConfigError("recipe.power_2_scales", cfg.power_2_scales, f"TE's {name}.{attr} has power_2_scale="
                              f"{qp.power_2_scale}, amax_epsilon={qp.amax_epsilon} (an NVTE_* variable); unset it")  # fmt: skip
    return obj


def te_autocast(te: Any, recipe_obj: Any, group: Any = None, *, enabled: bool = True) -> Any:
    """TE's autocast: ``autocast(enabled, recipe, amax_reduction_group)`` (TE >= 2.9) or
    ``fp8_autocast(enabled, fp8_recipe, fp8_group)``, whichever ``te`` has."""
    if hasattr(te, "autocast"):
        return te.autocast(enabled=enabled, recipe=recipe_obj, amax_reduction_group=group)
    if hasattr(te, "fp8_autocast"):
        return te.fp8_autocast(enabled=enabled, fp8_recipe=recipe_obj, fp8_group=group)
    raise RuntimeError("transformer_engine.pytorch has neither autocast nor fp8_autocast")


def te_model_init(te: Any, recipe_obj: Any = None, *, enabled: bool = True) -> Any:
    """TE's quantized-parameter init context: ``quantized_model_init`` (>= 2.9) or ``fp8_model_init``."""
    fn = getattr(te, "quantized_model_init", None) or te.fp8_model_init
    return fn(enabled=enabled, recipe=recipe_obj)


def te_capability_reason(quantizer: str | None, capability: tuple[int, int], cuda: str | None) -> str | None:
    """Why TE's recipe for ``quantizer`` cannot run on a GPU of ``capability`` under CUDA ``cuda``."""
    need_cc, need_cuda, what = _NEEDS.get(quantizer or "", ((8, 9), None, "FP8"))
    have = tuple(int(p) for p in (cuda or "0.0").split(".")[:2])
    cc = f"{capability[0]}.{capability[1]}"
    if capability < need_cc:
        return f"Transformer Engine {what} needs compute capability >= {need_cc[0]}.{need_cc[1]}, not {cc}; {_ALT}"
    if quantizer == "mx" and capability >= (12, 0):
        return f"Transformer Engine MXFP8 is not supported on compute capability {cc} (12.0+) yet; {_ALT}"
    need_cuda = need_cuda or ((12, 1) if capability == (8, 9) else None)  # FP8 on Ada
    if need_cuda is not None and have < need_cuda:
        return f"Transformer Engine {what} needs CUDA >= {need_cuda[0]}.{need_cuda[1]}, not {cuda}; {_ALT}"
    return None


def te_unavailable_reason(device: str, quantizer: str | None = None) -> str | None:
    """None when TE imports, ``device`` is CUDA and its GPU runs ``quantizer``'s TE recipe; else one line."""
    if str(device).split(":")[0] != "cuda":
        return f"Transformer Engine needs a CUDA GPU of compute capability >= 8.9, not {device}; {_ALT}"
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception as e:  # ImportError; OSError / RuntimeError without libcuda (TE >= 2.17)
        msg = " ".join(str(e).split())[:160]
        return f"Transformer Engine is not importable ({type(e).__name__}: {msg}); install it, or {_ALT}"
    if not torch.cuda.is_available():
        return f"Transformer Engine needs a CUDA GPU, and torch sees none; {_ALT}"
    return te_capability_reason(quantizer, torch.cuda.get_device_capability(), torch.version.cuda)


def check_te_dims(
    layers: Mapping[str, tuple[int, int]], tokens_per_micro_batch: int | None, *, quantizer: str | None = None
) -> None:
    """ConfigError unless each layer's (in_features, out_features) and the tokens per micro-batch are
    multiples of 16 and 8 (TE's ``assert_dim_for_fp8_exec``); MXFP8: 32 / 32, NVFP4: 16 / 16 (blocks)."""
    feat, tok = _MULTIPLES.get(quantizer or "", (16, 8))
    for name, dims in layers.items():
        for what, d in zip(("in_features", "out_features"), dims):
            if d % feat:
                raise ConfigError("recipe.backend", "te", f"TE needs {what} divisible by {feat}, but {name}.{what}"
                                  f"={d}; keep {name} in high precision (recipe.skip_modules), or {_EMULATED}")  # fmt: skip
    if tokens_per_micro_batch is not None and tokens_per_micro_batch % tok:
        raise ConfigError("recipe.backend", "te", f"TE needs tokens per micro-batch divisible by {tok}, not "
                          f"{tokens_per_micro_batch}; change trainer.micro_batch_size or model.seq_len, or {_EMULATED}")  # fmt: skip


def te_parallel_problem(*, zero_stage: int, offload_optimizer: bool, offload_param: bool, any_bias_false: bool,
                        allow_offload: bool, activation_checkpointing: bool = False) -> ConfigError | None:  # fmt: skip
    """The ZeRO / recompute settings TE modules are known not to work with (None: none of them)."""
    if (offload_optimizer or offload_param) and not allow_offload:
        return ConfigError("recipe.te_allow_offload", False, "ZeRO CPU offload with Transformer Engine modules is "
                           "unverified upstream; set recipe.te_allow_offload=true to try it, or turn "
                           "parallel.offload_optimizer and parallel.offload_param off")  # fmt: skip
    if zero_stage == 3 and any_bias_false:
        return ConfigError("model.bias", False, "te.Linear(bias=False) fails under ZeRO-3 zero.Init (DeepSpeed "
                           "issue #4095); set model.bias=true or parallel=zero2")  # fmt: skip
    if activation_checkpointing:
        return ConfigError("trainer.activation_checkpointing", True, "torch.utils.checkpoint recomputes TE "
                           "modules outside TE's autocast (TE's checkpoint is not wired); set it false")  # fmt: skip
    return None


@dataclass(frozen=True)
class TESwap:
    """One TE module replacing ``modules`` (the norm first when fused), installed at ``target``."""

    kind: str  # Linear | LayerNormLinear | LayerNormMLP
    modules: tuple[str, ...]
    target: str
    in_features: int
    out_features: int
    bias: bool
    normalization: str | None = None  # LayerNorm | RMSNorm (TE's ``normalization``), fused kinds
    eps: float | None = None
    norm_bias: bool = False  # our LayerNorm has a bias; TE's always has one (else frozen at zero)
    activation: str | None = None  # gelu (tanh, as TE's) | swiglu (SiLU of the first half, as TE's)
    ffn_hidden_size: int | None = None


def _norm_spec(norm: Any, dim: int) -> tuple[str, float, bool] | None:
    """(normalization, eps, has_bias) of a norm over ``dim`` that TE can fuse, or None."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (dim,):
        return None
    if isinstance(norm, nn.LayerNorm):
        return "LayerNorm", float(norm.eps), norm.bias is not None
    eps = getattr(norm, "eps", None)
    return ("RMSNorm", eps, False) if type(norm).__name__ == "RMSNorm" and isinstance(eps, float) else None


def _fused(model: nn.Module, conv: set[str]) -> dict[str, TESwap]:
    """First replaced Linear -> its fused swap, for each block whose layout allows one."""
    out: dict[str, TESwap] = {}
    for bname, block in model.named_modules():
        p = f"{bname}." if bname else ""
        qkv = getattr(getattr(block, "attn", None), "qkv", None)
        if isinstance(qkv, nn.Linear) and f"{p}attn.qkv" in conv:
            if spec := _norm_spec(getattr(block, "norm1", None), qkv.in_features):
                out[f"{p}attn.qkv"] = TESwap("LayerNormLinear", (f"{p}norm1", f"{p}attn.qkv"), f"{p}attn.qkv",
                                             qkv.in_features, qkv.out_features, qkv.bias is not None, *spec)  # fmt: skip
        mlp = getattr(block, "mlp", None)
        fc, proj, sw = getattr(mlp, "fc", None), getattr(mlp, "proj", None), getattr(mlp, "swiglu", None)
        if (
            not (isinstance(fc, nn.Linear) and isinstance(proj, nn.Linear))
            or {f"{p}mlp.fc", f"{p}mlp.proj"} - conv
        ):
            continue  # fmt: skip
        act = "swiglu" if sw is True else "gelu" if sw is False else None  # train.model.MLP's flag
        spec = _norm_spec(getattr(block, "norm2", None), fc.in_features)
        same_bias = (fc.bias is None) == (proj.bias is None)
        fits = fc.out_features == (2 if sw else 1) * proj.in_features and same_bias
        if act and spec and fits:  # TE's fc1 rows: [gate; up] for swiglu, as ours
            out[f"{p}mlp.fc"] = TESwap("LayerNormMLP", (f"{p}norm2", f"{p}mlp.fc", f"{p}mlp.proj"), f"{p}mlp",
                                       fc.in_features, proj.out_features, fc.bias is not None, *spec,
                                       activation=act, ffn_hidden_size=proj.in_features)  # fmt: skip
    return out


def plan_te_swap(model: nn.Module, converted: list[str], *, fuse_layernorm: bool) -> list[TESwap]:
    """The TE modules replacing the ``converted`` Linear layers, in module order. Reads shapes only
    (a meta-device model will do). Fusion assumes ``train.model``'s pre-norm block
    (``x + attn(norm1(x))``, ``x + mlp(norm2(x))``) and needs every fused Linear converted."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if missing := [n for n in converted if n not in linears]:
        raise ValueError(f"not Linear layers of the model: {missing}")
    params = [p for _, p in model.named_parameters(remove_duplicate=False)]
    for n in converted:
        if sum(p is linears[n].weight for p in params) > 1:
            raise config_error("skip_modules", n, f"{n}.weight is shared (tied embeddings) but a TE module owns "
                               f"its weight; keep {n} in high precision via recipe.skip_modules")  # fmt: skip
    fused = _fused(model, set(converted)) if fuse_layernorm else {}
    covered = {m for s in fused.values() for m in s.modules}
    plan: list[TESwap] = []
    for n in converted:
        if n in fused:
            plan.append(fused[n])
        elif n not in covered:
            lin = linears[n]
            plan.append(TESwap("Linear", (n,), n, lin.in_features, lin.out_features, lin.bias is not None))
    return plan


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def swap_to_te(model: nn.Module, plan: list[TESwap], te: Any) -> None:
    """Install ``plan``'s TE modules (``te`` = ``transformer_engine.pytorch``) with the replaced
    modules' weights, dtype and device. A fused norm becomes ``nn.Identity``, so the residual
    still adds the un-normalized x. Unverified until a GPU run with TE records it."""
    for s in plan:
        mods: list[Any] = [model.get_submodule(n) for n in s.modules]
        w = mods[-1].weight
        kw: dict[str, Any] = dict(bias=s.bias, params_dtype=w.dtype, device=w.device)
        pairs: list[tuple[str, Any]] = []
        if s.kind != "Linear":  # fused: the norm's parameters move into the TE module
            norm = mods.pop(0)
            kw.update(eps=s.eps, normalization=s.normalization)
            pairs = [("layer_norm_weight", norm.weight), ("layer_norm_bias", getattr(norm, "bias", None))]
            _set_submodule(model, s.modules[0], nn.Identity())
        if s.kind == "LayerNormMLP":
            new = te.LayerNormMLP(s.in_features, s.ffn_hidden_size, activation=s.activation, **kw)
            pairs += [("fc1_weight", mods[0].weight), ("fc1_bias", mods[0].bias),
                      ("fc2_weight", mods[1].weight), ("fc2_bias", mods[1].bias)]  # fmt: skip
        else:  # te.Linear | te.LayerNormLinear
            new = getattr(te, s.kind)(s.in_features, s.out_features, **kw)
            pairs += [("weight", mods[0].weight), ("bias", mods[0].bias)]
        for attr, src in pairs:
            dst = getattr(new, attr, None)
            if isinstance(dst, nn.Parameter) and dst.numel():
                if src is None:  # TE's LayerNorm bias where ours has none: zero, frozen
                    dst.zero_().requires_grad_(False)
                else:
                    dst.copy_(src)
        _set_submodule(model, s.target, new)
