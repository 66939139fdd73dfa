"""Quantized recipes (any backend): module filter, conversion report, validation errors, delayed-scaling updates."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from recipes.base import get_recipe
from recipes.config import RecipeConfig
from recipes.errors import ConfigError
from recipes.filter import block_index, name_matches, select_modules
from recipes.plain import PlainRecipe
from recipes.qattention import QuantAttentionCore
from recipes.qlinear import QuantLinear
from recipes.quantized import QuantizedRecipe
from train.config import ModelConfig
from train.model import GPT, build_model

CONF = Path(__file__).resolve().parents[1] / "conf" / "recipe"
TINY_NAMES = [
    f"blocks.{i}.{m}" for i in range(4) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
] + ["lm_head"]


def raw_preset(name: str) -> dict:
    """A preset's own values (its Hydra ``defaults`` list dropped: the schema defaults fill the rest)."""
    raw = yaml.safe_load((CONF / f"{name}.yaml").read_text()) or {}
    return {k: v for k, v in raw.items() if k != "defaults"}


def preset(name: str, **over) -> RecipeConfig:
    return dataclasses.replace(RecipeConfig(**raw_preset(name)), **over)


#: the quantized presets: every conf/recipe/*.yaml whose kind is not ``none`` (presets are data)
QUANTIZED_PRESETS = sorted(
    f.stem for f in CONF.glob("*.yaml") if raw_preset(f.stem).get("quantizer", "none") != "none"
)


def tiny(**over) -> GPT:
    return build_model(ModelConfig(**over), vocab_size=256, seed=0)


def meta_model(**over) -> GPT:
    with torch.device("meta"):
        return GPT(ModelConfig(**over), vocab_size=256)


# ---------------------------------------------------------------- filter


def test_filter_default_skips_only_lm_head():
    d = select_modules(TINY_NAMES)
    assert d.kept == ["lm_head"] and len(d.converted) == 16 and d.reasons["lm_head"] == "skip regex 'lm_head'"


def test_filter_first_last_blocks_and_regexes():
    d = select_modules(TINY_NAMES, skip=["lm_head", r"attn\.proj$"], keep_first_blocks=1, keep_last_blocks=1)
    assert d.converted == ["blocks.1.attn.qkv", "blocks.1.mlp.fc", "blocks.1.mlp.proj",
                           "blocks.2.attn.qkv", "blocks.2.mlp.fc", "blocks.2.mlp.proj"]  # fmt: skip
    assert (
        d.reasons["blocks.0.mlp.fc"] == "first 1 blocks" and d.reasons["blocks.3.mlp.fc"] == "last 1 blocks"
    )
    assert d.reasons["blocks.2.attn.proj"].startswith("skip regex")
    assert block_index("blocks.12.mlp.fc") == 12 and block_index("lm_head") is None


def test_filter_patterns_match_whole_name_components():
    names = [f"blocks.{i}.{m}" for i in (1, 11) for m in ("attn.qkv", "mlp.fc", "mlp.fc_gate")] + ["lm_head"]
    # re.search would let blocks.1 take blocks.11's layers, and mlp.fc take mlp.fc_gate
    assert select_modules(names, skip=["blocks.1"]).kept == [n for n in names if n.startswith("blocks.1.")]
    assert select_modules(names, skip=[r"mlp\.fc"]).kept == ["blocks.1.mlp.fc", "blocks.11.mlp.fc"]
    assert select_modules(names, skip=["mlp"]).kept == [n for n in names if ".mlp." in n]
    assert select_modules(names, skip=[r"^blocks\.11\.mlp\.fc$", "head"]).kept == ["blocks.11.mlp.fc"]
    assert select_modules(names, skip=["attn|lm_head"]).kept == [
        "blocks.1.attn.qkv",
        "blocks.11.attn.qkv",
        "lm_head",
    ]
    assert name_matches("blocks.1.mlp", "blocks.1.mlp.fc") and not name_matches(
        "blocks.1.mlp", "blocks.11.mlp.fc"
    )


# ---------------------------------------------------------------- presets


def test_presets_cover_every_quantizer_kind():
    assert {preset(n).quantizer for n in QUANTIZED_PRESETS} == {
        "mx", "nvfp4", "fp8_delayed", "fp8_current", "fp8_rowwise", "fp8_block"
    }  # fmt: skip
    assert len(QUANTIZED_PRESETS) == 13


@pytest.mark.parametrize("name", QUANTIZED_PRESETS)
def test_presets_are_emulated_bf16_and_valid_on_tiny(name):
    cfg = preset(name)
    assert cfg.precision == "bf16" and cfg.backend == "auto"
    assert (CONF / f"{name}.yaml").read_text().startswith("# "), "each preset opens with what it emulates"
    rec = get_recipe(cfg)
    assert isinstance(rec, QuantizedRecipe)
    assert rec.resolve_backend("cpu") == (
        "emulated",
        f"recipe.backend=auto resolved to 'emulated' on cpu (no hardware backend for {name})",
    )
    rec.check(meta_model())


def test_engine_settings_equal_bf16_preset():
    bf16 = dataclasses.asdict(preset("bf16"))
    engine = (
        "precision",
        "backend",
        "loss_scale",
        "initial_scale_power",
        "loss_scale_window",
        "hysteresis",
        "min_loss_scale",
    )
    for name in QUANTIZED_PRESETS:
        cfg = dataclasses.asdict(preset(name))
        assert {k: cfg[k] for k in engine} == {k: bf16[k] for k in engine}, name


def test_convert_reports_and_keeps_weights():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rec = get_recipe(preset("mxfp8_e4m3"))
    rec.resolve_backend("cpu")
    report = rec.convert(model)
    assert report.summary() == "converted 8/9 Linear; kept in high precision: lm_head"
    assert isinstance(model.blocks[1].mlp.proj, QuantLinear) and type(model.lm_head) is nn.Linear
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    d = rec.describe()
    assert d["conversion"] == report.summary() and d["quantizer"] == "mx" and d["compile"] is False
    assert d["roles"]["weight_dgrad"].startswith("mx fp8_e4m3 1x32")
    assert report.reasons == {"lm_head": "skip regex 'lm_head'"} and d["kept_reasons"] == report.reasons


def test_convert_keep_blocks_and_attention():
    model = tiny(n_layers=3)
    rec = get_recipe(preset("mxfp6_e3m2", keep_first_blocks=1, quantize_attention=True))
    rec.convert(model)
    assert rec.report.summary() == (
        "converted 8/13 Linear; kept in high precision: blocks.0.attn.qkv, blocks.0.attn.proj, "
        "blocks.0.mlp.fc, blocks.0.mlp.proj, lm_head"
    )
    assert rec.report.reasons["blocks.0.mlp.fc"] == "first 1 blocks"
    assert not isinstance(model.blocks[0].attn.core, QuantAttentionCore)
    assert isinstance(model.blocks[2].attn.core, QuantAttentionCore)
    assert rec.describe()["attention"] == "QK^T and PV quantized in 2/3 attention cores"
    loss = model(torch.randint(0, 256, (2, 128)), torch.randint(0, 256, (2, 128)))
    loss.backward()
    assert torch.isfinite(loss) and model.blocks[2].attn.qkv.weight.grad is not None


# ---------------------------------------------------------------- validation


def check_error(cfg: RecipeConfig, model=None) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        get_recipe(cfg).check(model if model is not None else meta_model())
    return e.value


def test_native_backend_is_refused_and_hardware_backends_resolve_per_device():
    e = check_error(preset("fp8_delayed", backend="native"))
    assert e.key == "recipe.backend" and "auto, emulated, torch" in e.fix
    with pytest.raises(ConfigError) as te:
        get_recipe(preset("fp8_delayed", backend="te")).resolve_backend("cpu")
    assert te.value.key == "recipe.backend" and "Transformer Engine" in te.value.fix
    with pytest.raises(ConfigError) as torch_mx:  # the CPU's scaled matmul refuses E8M0 scales
        get_recipe(preset("mxfp8_e4m3", backend="torch")).resolve_backend("cpu")
    assert "recipe.backend=emulated" in torch_mx.value.fix
    assert get_recipe(preset("fp8_delayed", backend="torch")).resolve_backend("cpu") == ("torch", None)


@pytest.mark.parametrize("block", [0, 3, 48, 512])
def test_block_size_must_be_power_of_two_in_range(block):
    e = check_error(preset("mxfp8_e4m3", block_size=block))
    assert e.key == "recipe.block_size" and "power of two from 2 to 256" in e.fix


def test_block_size_must_divide_reduction_dims():
    e = check_error(preset("mxfp8_e4m3"), meta_model(d_model=48, n_heads=4))
    assert e.key == "recipe.block_size" and "blocks.0.attn.qkv.in_features=48" in e.fix
    e = check_error(preset("fp8_block"), meta_model(d_model=192, n_heads=4))  # 192 % 128
    assert e.key == "recipe.block_size" and "=192" in e.fix
    get_recipe(preset("mxfp8_e4m3", block_size=16)).check(meta_model(d_model=48, n_heads=4))
    e = check_error(preset("mxfp8_e4m3", block_size=64, quantize_attention=True))  # head dim 32
    assert e.key == "recipe.block_size" and "head dim 32" in e.fix


@pytest.mark.parametrize(
    "over,key,text",
    [
        ({"input_format": "fp5"}, "recipe.input_format", "unknown MX element format"),
        ({"rounding": "up"}, "recipe.rounding", "nearest_even"),
        ({"grad_rounding": "up"}, "recipe.grad_rounding", "or same"),
        ({"scale_rule": "round"}, "recipe.scale_rule", "rceil"),
        ({"skip_modules": ["("]}, "recipe.skip_modules", "not a valid regex"),
        ({"compile": "maybe"}, "recipe.compile", "auto"),
        ({"keep_last_blocks": -1}, "recipe.keep_last_blocks", ">= 0"),
        ({"weight_2d_blocks": True}, "recipe.weight_2d_blocks", "nvfp4 and fp8_block"),
        (
            {"input_format": None, "weight_format": None, "grad_output_format": None},
            "recipe.input_format",
            "quantizes nothing",
        ),
        ({"quantizer": "none"}, "recipe.quantizer", "mx"),
        ({"quantizer": "mxx"}, "recipe.quantizer", "use one of: fp8_block, fp8_current"),
    ],
)
def test_bad_settings_name_the_key(over, key, text):
    e = check_error(preset("mxfp8_e4m3", **over))
    assert e.key == key and text in e.fix, (e.key, e.fix)


def test_plain_recipe_refuses_quantized_operands_and_quantized_recipe_refuses_none():
    """``+recipe=mxfp8_e4m3 recipe.quantizer=none`` would silently run plain BF16: refused."""
    assert isinstance(get_recipe(preset("bf16")), PlainRecipe)
    get_recipe(preset("bf16")).check(meta_model())
    e = check_error(preset("mxfp8_e4m3", quantizer="none"))
    assert e.key == "recipe.quantizer" and "recipe.input_format=fp8_e4m3" in e.fix and "mx" in e.fix
    with pytest.raises(ConfigError, match="use one of mx, nvfp4"):
        QuantizedRecipe(preset("mxfp8_e4m3", quantizer="none")).check(meta_model())


def test_fp8_settings_are_checked():
    e = check_error(preset("fp8_current", grad_output_format="fp8_e4m3"))
    assert e.key == "recipe.grad_output_format" and "fp8_e5m2" in e.fix
    e = check_error(preset("fp8_delayed", rounding="stochastic"))
    assert e.key == "recipe.rounding" and "nearest-even" in e.fix
    e = check_error(preset("fp8_current", block_size=32))
    assert e.key == "recipe.block_size" and "block_size=0" in e.fix
    e = check_error(preset("nvfp4", block_size=32))
    assert e.key == "recipe.block_size" and "16" in e.fix
    e = check_error(preset("nvfp4", input_format="fp8_e4m3"))
    assert e.key == "recipe.input_format"


# ---------------------------------------------------------------- delayed scaling through the recipe


def test_fp8_delayed_recipe_updates_scales_and_reduces(monkeypatch):
    model = tiny()
    rec = get_recipe(preset("fp8_delayed", amax_history_len=4))
    rec.resolve_backend("cpu")
    rec.convert(model)
    names = rec.delayed.names
    assert names[:3] == (
        "blocks.0.attn.qkv/input",
        "blocks.0.attn.qkv/weight",
        "blocks.0.attn.qkv/grad_output",
    )
    assert len(names) == 24 and rec.describe()["delayed_scaling_tensors"] == 24
    model.bfloat16()
    model(torch.randint(0, 256, (2, 128)), torch.randint(0, 256, (2, 128))).backward()
    assert bool((rec.delayed.amax_history[0] > 0).all()) and bool((rec.delayed.scales == 1).all())

    import torch.distributed as dist

    reduced = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: reduced.append((t.clone(), op)))
    rec.on_optimizer_step()
    assert len(reduced) == 1 and reduced[0][1] == dist.ReduceOp.MAX and reduced[0][0].shape == (24,)
    amax = rec.delayed.amax_history[-1]
    want = torch.tensor([448.0 if not n.endswith("grad_output") else 57344.0 for n in names]) / amax
    assert torch.equal(rec.delayed.scales, want)


def test_recipe_state_round_trips_for_checkpoints():
    x, y = torch.randint(0, 256, (2, 128)), torch.randint(0, 256, (2, 128))

    def trained(steps: int) -> QuantizedRecipe:
        model = tiny()
        rec = get_recipe(preset("fp8_delayed", amax_history_len=4))
        rec.convert(model)
        for _ in range(steps):
            model(x, y).backward()
            rec.on_optimizer_step()
        return rec

    src = trained(2)
    state = src.state_dict()
    dst = trained(0)
    dst.load_state_dict(state)
    assert torch.equal(dst.delayed.scales, src.delayed.scales)
    assert torch.equal(dst.delayed.amax_history, src.delayed.amax_history)
    assert get_recipe(preset("bf16")).state_dict() == {}

    sr = get_recipe(preset("nvfp4"))
    sr.sr.get(torch.device("cpu"))
    saved = sr.state_dict()
    a = torch.rand(4, generator=sr.sr.get(torch.device("cpu")))
    sr.load_state_dict(saved)
    assert torch.equal(torch.rand(4, generator=sr.sr.get(torch.device("cpu"))), a)
