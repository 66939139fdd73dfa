"""``recipes.te_backend`` on CPU, without Transformer Engine installed.

What runs here: the recipe spec of every preset against TE's documented recipe parameters
(written out below from TE's source), each refusal's one-line error, the hardware and dimension
rules, the parallelism refusals, and the swap plan on the real GPT built on the meta device.
Fake ``te`` namespaces appear only where the code under test is our own branching and plumbing
(``te_autocast`` / ``te_model_init`` rename detection, ``build_te_recipe``'s kwargs and environment
checks), never to stand in for TE's numerics. The one test that needs TE runs on a GPU only.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import enum
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from recipes.base import get_recipe, iter_linears
from recipes.config import RecipeConfig
from recipes.errors import ConfigError
from recipes.filter import num_blocks, select_modules
from recipes.te_backend import (
    TESwap,
    build_te_recipe,
    check_te_dims,
    plan_te_swap,
    swap_to_te,
    te_autocast,
    te_capability_reason,
    te_model_init,
    te_parallel_problem,
    te_recipe_spec,
    te_unavailable_reason,
)
from train.config import ModelConfig
from train.model import GPT

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (ROOT / "conf" / "recipe").glob("*.yaml"))

# The dataclass fields (= constructor keywords) of TE's recipe classes, read from
# transformer_engine/common/recipe/__init__.py of NVIDIA/TransformerEngine at main d0067d0da6cb
# (2026-08-22, version 2.20.0.dev0). Not in the Parameters docstrings but fields all the same:
# Float8BlockScaling's x/w/grad_block_scaling_dim.
TE_RECIPE_SIGNATURES: dict[str, set[str]] = {
    "DelayedScaling": {"margin", "fp8_format", "amax_history_len", "amax_compute_algo",
                       "scaling_factor_compute_algo", "reduce_amax", "fp8_dpa", "fp8_mha", "backward_override"},
    "Float8CurrentScaling": {"use_power_2_scales", "fp8_format", "fp8_gemm_fprop", "fp8_gemm_dgrad",
                             "fp8_gemm_wgrad", "fp8_dpa", "fp8_mha", "backward_override"},
    "MXFP8BlockScaling": {"margin", "fp8_format", "fp8_dpa", "fp8_mha", "backward_override",
                          "enable_2d_quantization"},
    "Float8BlockScaling": {"use_f32_scales", "fp8_format", "x_block_scaling_dim", "w_block_scaling_dim",
                           "grad_block_scaling_dim", "fp8_gemm_fprop", "fp8_gemm_dgrad", "fp8_gemm_wgrad",
                           "fp8_dpa", "fp8_mha", "backward_override"},
    "NVFP4BlockScaling": {"disable_rht", "disable_stochastic_rounding", "disable_2d_quantization",
                          "row_scaled_activation", "nvfp4_4over6", "nvfp4_4over6_e4m3_use_256",
                          "nvfp4_4over6_err_mode", "fp4_format", "fp8_format", "fp8_dpa", "fp8_mha",
                          "backward_override"},
}  # fmt: skip
# The same at the oldest TE the project supports (pyproject: transformer-engine>=2.3; tag v2.3),
# NVFP4BlockScaling at its first release (tag v2.8): what we emit must exist in both.
TE_OLDEST_SIGNATURES: dict[str, set[str]] = {
    "DelayedScaling": {"margin", "fp8_format", "amax_history_len", "amax_compute_algo",
                       "scaling_factor_compute_algo", "reduce_amax", "fp8_dpa", "fp8_mha"},
    "Float8CurrentScaling": {"fp8_format", "fp8_gemm_fprop", "fp8_gemm_dgrad", "fp8_gemm_wgrad", "fp8_dpa",
                             "fp8_mha"},
    "MXFP8BlockScaling": {"margin", "fp8_format", "fp8_dpa", "fp8_mha"},
    "Float8BlockScaling": {"use_f32_scales", "fp8_format", "x_block_scaling_dim", "w_block_scaling_dim",
                           "grad_block_scaling_dim", "fp8_gemm_fprop", "fp8_gemm_dgrad", "fp8_gemm_wgrad",
                           "fp8_dpa", "fp8_mha"},
    "NVFP4BlockScaling": {"disable_rht", "disable_stochastic_rounding", "disable_2d_quantization", "fp4_format",
                          "fp8_format", "fp8_dpa", "fp8_mha"},
}  # fmt: skip
# Documented types / values (TE's annotations and docstrings; Format members by name).
TE_PARAM_TYPES: dict[str, object] = {
    "fp8_format": {"E4M3", "HYBRID"},  # "{Format.E4M3, Format.HYBRID}"; E5M2 asserts
    "fp4_format": {"E2M1"},
    "margin": int,
    "amax_history_len": int,
    "amax_compute_algo": {"max", "most_recent"},
    "reduce_amax": bool,
    "fp8_dpa": bool,
    "fp8_mha": bool,
    "x_block_scaling_dim": {1, 2},
    "w_block_scaling_dim": {1, 2},
    "grad_block_scaling_dim": {1, 2},
    "disable_rht": bool,
    "disable_stochastic_rounding": bool,
    "disable_2d_quantization": bool,
}
#: preset -> (TE recipe class, the overrides backend=te needs)
MAPPING = {
    "fp8_delayed": ("DelayedScaling", {"amax_update": "microbatch"}),
    "fp8_current": ("Float8CurrentScaling", {}),
    "fp8_block": ("Float8BlockScaling", {}),
    "mxfp8": ("MXFP8BlockScaling", {}),
    "nvfp4": ("NVFP4BlockScaling", {}),
}


def preset(name: str, **over: object) -> RecipeConfig:
    raw = OmegaConf.load(ROOT / "conf" / "recipe" / f"{name}.yaml")
    raw.pop("defaults", None)
    node = OmegaConf.merge(OmegaConf.structured(RecipeConfig), raw, {"backend": "te", **over})
    cfg = OmegaConf.to_object(node)
    assert isinstance(cfg, RecipeConfig)
    return cfg


def documented(key: str, value: object) -> bool:
    want = TE_PARAM_TYPES[key]
    if isinstance(want, set):
        return type(value) in (str, int) and value in want
    return type(value) is want  # exact: a bool is not an int here


# ----------------------------------------------------------------------------- recipe spec


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_maps_to_documented_te_kwargs_or_is_refused(name):
    if name not in MAPPING:
        with pytest.raises(ConfigError) as e:
            te_recipe_spec(preset(name))
        assert "recipe.backend=emulated" in e.value.fix, str(e.value)
        return
    cls, over = MAPPING[name]
    got_cls, kwargs = te_recipe_spec(preset(name, **over))
    assert got_cls == cls
    assert set(kwargs) <= TE_RECIPE_SIGNATURES[cls], set(kwargs) - TE_RECIPE_SIGNATURES[cls]
    assert set(kwargs) <= TE_OLDEST_SIGNATURES[cls], set(kwargs) - TE_OLDEST_SIGNATURES[cls]
    bad = {k: v for k, v in kwargs.items() if not documented(k, v)}
    assert not bad, bad


def test_the_mapping_presets_are_exactly_the_te_twins():
    maps = set()
    for name in PRESETS:
        with contextlib.suppress(ConfigError):
            te_recipe_spec(preset(name, **MAPPING.get(name, ("", {}))[1]))
            maps.add(name)
    assert maps == set(MAPPING)


def test_spec_values_follow_the_config():
    cls, kw = te_recipe_spec(preset("fp8_delayed", amax_update="microbatch", margin=2, amax_history_len=16,
                                    amax_compute_algo="most_recent", fp8_format="E4M3",
                                    grad_output_format="fp8_e4m3"))  # fmt: skip
    assert kw == {"fp8_format": "E4M3", "margin": 2, "amax_history_len": 16, "amax_compute_algo": "most_recent",
                  "reduce_amax": True, "fp8_dpa": False, "fp8_mha": False}  # fmt: skip
    assert te_recipe_spec(preset("fp8_current"))[1]["fp8_format"] == "HYBRID"
    assert te_recipe_spec(preset("fp8_block"))[1]["w_block_scaling_dim"] == 2
    assert te_recipe_spec(preset("fp8_block", weight_2d_blocks=False))[1]["w_block_scaling_dim"] == 1
    assert te_recipe_spec(preset("mxfp8"))[1]["fp8_format"] == "E4M3"
    assert te_recipe_spec(preset("mxfp8", grad_output_format="fp8_e5m2"))[1]["fp8_format"] == "HYBRID"
    nv = te_recipe_spec(preset("nvfp4"))[1]
    assert not (nv["disable_rht"] or nv["disable_stochastic_rounding"] or nv["disable_2d_quantization"])
    nv = te_recipe_spec(preset("nvfp4", wgrad_hadamard=False, grad_rounding="same", weight_2d_blocks=False))[
        1
    ]
    assert nv["disable_rht"] and nv["disable_stochastic_rounding"] and nv["disable_2d_quantization"]


EMULATED = "use recipe.backend=emulated"
REFUSALS = [
    ("fp8_rowwise", {}, "recipe.quantizer", "fp8_rowwise", "no rowwise recipe"),
    ("bf16", {}, "recipe.quantizer", "none", EMULATED),
    ("mxfp4_e2m1", {}, "recipe.input_format", "fp4_e2m1", "no MX FP6/FP4/INT8"),
    ("mxfp6_e3m2", {}, "recipe.input_format", "fp6_e3m2", "no MX FP6/FP4/INT8"),
    ("mxint8", {}, "recipe.input_format", "int8", "no MX FP6/FP4/INT8"),
    ("mx_paper_w4a6", {}, "recipe.input_format", "fp6_e3m2", "no MX FP6/FP4/INT8"),
    ("mxfp8_e5m2", {}, "recipe.input_format", "fp8_e5m2", "fp8_e4m3 x and W"),
    ("mxfp8_e4m3", {}, "recipe.scale_rule", "floor", "rceil"),
    ("mxfp8", {"grad_output_format": "fp6_e3m2"}, "recipe.grad_output_format", "fp6_e3m2", "fp8_e5m2"),
    ("mxfp8", {"rounding": "stochastic"}, "recipe.rounding", "stochastic", "nearest-even"),
    ("mxfp8", {"grad_rounding": "stochastic"}, "recipe.grad_rounding", "stochastic", "NVFP4"),
    ("mxfp8", {"input_wgrad_format": "fp8_e5m2"}, "recipe.input_wgrad_format", "fp8_e5m2", "as recipe.input_format=fp8_e4m3"),
    ("mxfp8", {"grad_output_wgrad_format": "fp8_e5m2"}, "recipe.grad_output_wgrad_format", "fp8_e5m2",
     "as recipe.grad_output_format=fp8_e4m3"),
    ("nvfp4", {"rounding": "stochastic"}, "recipe.rounding", "stochastic", "nearest-even"),
    ("fp8_delayed", {}, "recipe.amax_update", "step",
     "TE updates scales once per micro-batch; set recipe.amax_update=microbatch"),
    ("fp8_delayed", {"amax_update": "microbatch", "power_2_scales": True}, "recipe.power_2_scales", True,
     "environment"),
    ("fp8_block", {"block_size": 64}, "recipe.block_size", 64, "128"),
    ("fp8_block", {"power_2_scales": False}, "recipe.power_2_scales", False, "NVTE_FP8_BLOCK_SCALING_FP32_SCALES"),
    ("fp8_current", {"power_2_scales": True}, "recipe.power_2_scales", True, "NVTE_FP8_CURRENT_SCALING"),
    ("fp8_current", {"amax_epsilon": 1e-12}, "recipe.amax_epsilon", 1e-12, "0.0"),
    ("fp8_current", {"grad_output_format": None}, "recipe.grad_output_format", None, "every converted GEMM"),
    ("fp8_current", {"quantize_attention": True}, "recipe.quantize_attention", True, "SDPA"),
    ("fp8_current", {"compile": "true"}, "recipe.compile", "true", "auto or false"),
    ("fp8_current", {"fast_accum_dgrad": True}, "recipe.fast_accum_dgrad", True, "accumulation"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "over", "key", "value", "fix"), REFUSALS)
def test_refusals_name_the_key_value_and_fix(name, over, key, value, fix):
    with pytest.raises(ConfigError) as e:
        te_recipe_spec(preset(name, **over))
    err = e.value
    assert (err.key, err.value) == (key, value)
    assert str(err) == f"{key}={value}: {err.fix}"
    assert fix in err.fix, err.fix


# ----------------------------------------------------------------------------- hardware and dims


def test_unavailable_on_cpu_names_te_and_the_alternatives():
    why = te_unavailable_reason("cpu", quantizer="fp8_current")
    assert why and "Transformer Engine" in why and "\n" not in why
    assert "recipe.backend=torch" in why and "recipe.backend=emulated" in why


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None, reason="TE is installed here")
def test_unavailable_without_te_says_it_does_not_import():
    why = te_unavailable_reason("cuda", quantizer="fp8_delayed")
    assert why and "Transformer Engine is not importable" in why and "\n" not in why


@pytest.mark.parametrize(
    ("quantizer", "cc", "cuda", "needle"),
    [
        ("fp8_delayed", (9, 0), "12.4", None),
        ("fp8_current", (8, 9), "12.4", None),
        ("fp8_current", (8, 9), "12.0", "CUDA >= 12.1"),
        ("fp8_delayed", (8, 0), "12.4", ">= 8.9"),
        ("fp8_block", (9, 0), "12.4", "CUDA >= 12.9"),
        ("fp8_block", (9, 0), "12.9", None),
        ("mx", (9, 0), "12.8", ">= 10.0"),
        ("mx", (10, 0), "12.8", None),
        ("mx", (12, 0), "12.8", "12.0+"),
        ("nvfp4", (9, 0), "12.8", ">= 10.0"),
        ("nvfp4", (10, 0), "12.8", None),
    ],
)
def test_capability_rules_follow_te(quantizer, cc, cuda, needle):
    why = te_capability_reason(quantizer, cc, cuda)
    if needle is None:
        assert why is None
    else:
        assert why and needle in why and "Transformer Engine" in why and "recipe.backend=emulated" in why


def test_dims():
    check_te_dims({"a": (128, 384)}, 8)
    check_te_dims({"a": (128, 384)}, None)
    with pytest.raises(ConfigError, match=r"blocks\.0\.mlp\.fc\.in_features=24"):
        check_te_dims({"blocks.0.mlp.fc": (24, 64)}, 8)
    with pytest.raises(ConfigError, match="out_features=40"):
        check_te_dims({"x": (32, 40)}, 8)
    with pytest.raises(ConfigError, match="divisible by 8, not 12"):
        check_te_dims({"x": (32, 32)}, 12)
    check_te_dims({"x": (48, 48)}, 24, quantizer="fp8_block")
    check_te_dims({"x": (48, 48)}, 16, quantizer="nvfp4")
    with pytest.raises(ConfigError, match="divisible by 16, not 24"):
        check_te_dims({"x": (48, 48)}, 24, quantizer="nvfp4")
    with pytest.raises(ConfigError, match="divisible by 32"):
        check_te_dims({"x": (48, 64)}, 32, quantizer="mx")
    with pytest.raises(ConfigError, match="divisible by 32, not 48"):
        check_te_dims({"x": (64, 64)}, 48, quantizer="mx")
    assert str(pytest.raises(ConfigError, check_te_dims, {"x": (8, 16)}, 8).value).startswith(
        "recipe.backend=te: "
    )


def test_parallel_problems():
    ok = dict(
        zero_stage=2, offload_optimizer=False, offload_param=False, any_bias_false=True, allow_offload=False
    )
    assert te_parallel_problem(**ok) is None
    err = te_parallel_problem(**{**ok, "offload_optimizer": True})
    assert (
        err is not None and err.key == "recipe.te_allow_offload" and "recipe.te_allow_offload=true" in err.fix
    )
    assert str(err).startswith("recipe.te_allow_offload=False: ")
    assert te_parallel_problem(**{**ok, "offload_param": True, "allow_offload": True}) is None
    err = te_parallel_problem(**{**ok, "zero_stage": 3})
    assert err is not None and err.key == "model.bias" and "#4095" in err.fix
    assert "model.bias=true" in err.fix and "parallel=zero2" in err.fix
    assert te_parallel_problem(**{**ok, "zero_stage": 3, "any_bias_false": False}) is None
    err = te_parallel_problem(**ok, activation_checkpointing=True)
    assert err is not None and err.key == "trainer.activation_checkpointing"


# ----------------------------------------------------------------------------- swap plan


def tiny(**over: object) -> ModelConfig:
    raw = yaml.safe_load((ROOT / "conf" / "model" / "tiny.yaml").read_text())["model"]
    return dataclasses.replace(ModelConfig(**raw), **over)


def meta_gpt(**over: object) -> GPT:
    with torch.device("meta"):
        return GPT(tiny(**over), vocab_size=256)


def converted(model: torch.nn.Module, cfg: RecipeConfig) -> list[str]:
    names = [n for n, _ in iter_linears(model)]
    return select_modules(names, skip=cfg.skip_modules, keep_first_blocks=cfg.keep_first_blocks,
                          keep_last_blocks=cfg.keep_last_blocks,
                          total_blocks=num_blocks(n for n, _ in model.named_modules())).converted  # fmt: skip


def kinds(plan: list[TESwap]) -> list[tuple[str, tuple[str, ...]]]:
    return [(s.kind, s.modules) for s in plan]


def test_plan_without_fusion_swaps_each_converted_linear():
    model = meta_gpt()
    conv = converted(model, preset("fp8_current"))
    plan = plan_te_swap(model, conv, fuse_layernorm=False)
    assert [s.modules[0] for s in plan] == conv and "lm_head" not in conv and len(conv) == 8
    assert all(s.kind == "Linear" and s.target == s.modules[0] and not s.bias for s in plan)
    assert (plan[0].in_features, plan[0].out_features) == (128, 384)
    assert (plan[3].modules, plan[3].in_features, plan[3].out_features) == (("blocks.0.mlp.proj",), 512, 128)
    assert next(model.parameters()).is_meta


def test_plan_with_fusion_fuses_the_pre_norms():
    model = meta_gpt()
    plan = plan_te_swap(model, converted(model, preset("fp8_current")), fuse_layernorm=True)
    assert kinds(plan) == [
        (k, tuple(f"blocks.{i}.{m}" for m in mods))
        for i in range(2)
        for k, mods in [("LayerNormLinear", ("norm1", "attn.qkv")), ("Linear", ("attn.proj",)),
                        ("LayerNormMLP", ("norm2", "mlp.fc", "mlp.proj"))]
    ]  # fmt: skip
    ln, mlp = plan[0], plan[2]
    assert (ln.target, ln.normalization, ln.eps, ln.norm_bias, ln.in_features, ln.out_features) == (
        "blocks.0.attn.qkv", "LayerNorm", 1e-5, False, 128, 384)  # fmt: skip
    assert (mlp.target, mlp.activation, mlp.ffn_hidden_size, mlp.in_features, mlp.out_features) == (
        "blocks.0.mlp", "gelu", 512, 128, 128)  # fmt: skip


def test_plan_follows_the_filter_decisions():
    model = meta_gpt()
    plan = plan_te_swap(
        model, converted(model, preset("fp8_current", keep_first_blocks=1)), fuse_layernorm=True
    )
    assert [s.kind for s in plan] == ["LayerNormLinear", "Linear", "LayerNormMLP"]
    assert all(m.startswith("blocks.1.") for s in plan for m in s.modules)
    cfg = preset("fp8_current", skip_modules=["lm_head", r"mlp\.proj$"])
    plan = plan_te_swap(model, converted(model, cfg), fuse_layernorm=True)
    assert [s.kind for s in plan] == ["LayerNormLinear", "Linear", "Linear"] * 2  # fc alone: no MLP fusion
    cfg = preset("fp8_current", skip_modules=["lm_head", r"attn\.qkv$"])
    plan = plan_te_swap(model, converted(model, cfg), fuse_layernorm=True)
    assert [s.kind for s in plan] == ["Linear", "LayerNormMLP"] * 2  # norm1 stays: qkv is not converted


def test_plan_fuses_swiglu_rmsnorm_with_bias():
    model = meta_gpt(mlp="swiglu", norm="rmsnorm", bias=True, ffn_mult=8 / 3)
    plan = plan_te_swap(model, converted(model, preset("fp8_current")), fuse_layernorm=True)
    mlp = plan[2]
    assert (mlp.kind, mlp.activation, mlp.normalization, mlp.bias, mlp.norm_bias) == (
        "LayerNormMLP", "swiglu", "RMSNorm", True, False)  # fmt: skip
    assert mlp.ffn_hidden_size == tiny(mlp="swiglu", ffn_mult=8 / 3).ffn_dim
    assert plan[0].normalization == "RMSNorm" and plan[0].bias


def test_plan_refuses_a_tied_head_and_non_linears():
    model = meta_gpt(tie_embeddings=True)
    with pytest.raises(ConfigError) as e:
        plan_te_swap(model, converted(model, preset("fp8_current", skip_modules=[])), fuse_layernorm=False)
    assert e.value.key == "recipe.skip_modules" and e.value.value == "lm_head"
    with pytest.raises(ValueError, match="blocks.0.norm1"):
        plan_te_swap(meta_gpt(), ["blocks.0.norm1"], fuse_layernorm=False)


def test_dims_of_the_tiny_plan_fit_te():
    model = meta_gpt()
    plan = plan_te_swap(model, converted(model, preset("mxfp8")), fuse_layernorm=False)
    check_te_dims({s.target: (s.in_features, s.out_features) for s in plan}, 2 * 128, quantizer="mx")


# ----------------------------------------------------------------------------- our branching (fakes)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, **kw: object) -> contextlib.AbstractContextManager[None]:
        self.calls.append(kw)
        return contextlib.nullcontext()


def test_autocast_and_model_init_pick_the_te_2x_names_when_present():
    new, old = Recorder(), Recorder()
    te_autocast(SimpleNamespace(autocast=new, fp8_autocast=old), "R", "G")
    assert new.calls == [{"enabled": True, "recipe": "R", "amax_reduction_group": "G"}] and not old.calls
    te_autocast(SimpleNamespace(fp8_autocast=old), "R", None, enabled=False)
    assert old.calls == [{"enabled": False, "fp8_recipe": "R", "fp8_group": None}]
    with pytest.raises(RuntimeError):
        te_autocast(SimpleNamespace(), "R")
    new, old = Recorder(), Recorder()
    te_model_init(SimpleNamespace(quantized_model_init=new, fp8_model_init=old), "R")
    te_model_init(SimpleNamespace(fp8_model_init=old), "R", enabled=False)
    assert new.calls == [{"enabled": True, "recipe": "R"}] and old.calls == [
        {"enabled": False, "recipe": "R"}
    ]


class Format(enum.Enum):
    E2M1 = 1
    E4M3 = 2
    E5M2 = 3
    HYBRID = 4


def fake_recipes(**class_attrs: dict) -> SimpleNamespace:
    """Recipe classes that accept only TE's documented keywords and keep them as attributes."""

    def cls(name: str) -> type:
        def init(self, **kw):
            assert set(kw) <= TE_RECIPE_SIGNATURES[name], set(kw) - TE_RECIPE_SIGNATURES[name]
            self.__dict__.update(kw)

        return type(name, (), {"__init__": init, **class_attrs.get(name, {})})

    return SimpleNamespace(Format=Format, **{n: cls(n) for n in TE_RECIPE_SIGNATURES})


def test_build_te_recipe_passes_the_spec_with_format_members():
    obj = build_te_recipe(fake_recipes(), preset("fp8_delayed", amax_update="microbatch", margin=1))
    assert type(obj).__name__ == "DelayedScaling"
    assert (obj.fp8_format, obj.margin, obj.amax_history_len, obj.reduce_amax) == (
        Format.HYBRID,
        1,
        1024,
        True,
    )
    obj = build_te_recipe(fake_recipes(), preset("nvfp4"))
    assert obj.fp4_format is Format.E2M1 and obj.disable_rht is False
    assert build_te_recipe(fake_recipes(), preset("mxfp8")).fp8_format is Format.E4M3


def test_build_te_recipe_refuses_environment_overrides():
    qp = SimpleNamespace
    fp32_scales = {"Float8BlockScaling": {"fp8_quant_fwd_inp": qp(power_2_scale=False, amax_epsilon=0.0)}}
    with pytest.raises(ConfigError) as e:
        build_te_recipe(fake_recipes(**fp32_scales), preset("fp8_block"))
    assert e.value.key == "recipe.power_2_scales" and "fp8_quant_fwd_inp" in e.value.fix
    pow2 = {"Float8BlockScaling": {"fp8_quant_fwd_inp": qp(power_2_scale=True, amax_epsilon=0.0)}}
    build_te_recipe(fake_recipes(**pow2), preset("fp8_block"))
    override = {"Float8CurrentScaling": {"backward_override": "high_precision"}}
    with pytest.raises(ConfigError, match="backward_override=high_precision"):
        build_te_recipe(fake_recipes(**override), preset("fp8_current"))


# ----------------------------------------------------------------------------- GPU with TE

_TE_WHY = te_unavailable_reason("cuda", quantizer="fp8_current")


@pytest.mark.gpu
@pytest.mark.skipif(_TE_WHY is not None, reason=f"needs Transformer Engine on an FP8 GPU: {_TE_WHY}")
def test_swap_to_te_keeps_the_function_and_trains_under_autocast():
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe as te_recipes

    from train.model import build_model

    model = build_model(tiny(), vocab_size=256, seed=0).cuda()
    ref = copy.deepcopy(model)
    plan = plan_te_swap(model, converted(model, preset("fp8_current")), fuse_layernorm=True)
    swap_to_te(model, plan, te)
    assert isinstance(model.blocks[0].norm1, torch.nn.Identity)
    idx = torch.randint(0, 256, (2, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():  # outside the autocast TE runs in the parameter dtype: the same function
        torch.testing.assert_close(model(idx), ref(idx), rtol=2e-2, atol=2e-2)
    with te_autocast(te, build_te_recipe(te_recipes, preset("fp8_current"))):
        loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - ref(idx, idx).item()) < 0.1
    assert any(k.endswith("_extra_state") for k in model.state_dict())


def test_validation_applies_te_rules_to_the_composed_run():
    """``train.validate.check_te`` (run when recipe.backend resolves to te, i.e. on a GPU with TE):
    the converted layers of the real model and the ZeRO settings of the composed config."""
    from train.cli import compose
    from train.validate import check_te

    cfg = compose(
        ["+recipe=fp8_delayed", "recipe.amax_update=microbatch", "parallel=zero3", "model.bias=false"]
    )
    rec = get_recipe(cfg.recipe)
    with torch.device("meta"):
        model = GPT(cfg.model.resolve(256))
    with pytest.raises(ConfigError) as e:
        check_te(cfg, rec, model, tokens=16 * 128)
    assert e.value.key == "model.bias" and "4095" in e.value.fix
    ok = compose(["+recipe=fp8_delayed", "recipe.amax_update=microbatch", "parallel=zero2"])
    check_te(ok, get_recipe(ok.recipe), model, tokens=16 * 128)
    with pytest.raises(ConfigError, match="tokens per micro-batch"):
        check_te(ok, get_recipe(ok.recipe), model, tokens=12)
