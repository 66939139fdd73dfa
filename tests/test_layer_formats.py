"""Per-layer role formats (``recipe.layer_formats``): which layers get which formats, unchanged
numerics elsewhere, one-line config errors, and a YAML preset that trains."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from recipes.base import get_recipe
from recipes.config import ROLE_FORMAT_FIELDS, RecipeConfig
from recipes.errors import ConfigError
from recipes.filter import select_modules
from recipes.qlinear import LinearQuantizers, QuantLinear
from recipes.quantized import QuantizedRecipe
from recipes.quantized_checks import layer_override

from .conftest import ROOT, run_lowbit
from .test_recipes_quantized import meta_model, preset, tiny

FC1 = r"^blocks\.1\.mlp\.fc$"
FP4_WGRAD = {"grad_output_wgrad_format": "fp4_e2m1", "input_wgrad_format": "fp4_e2m1"}


def mx(**layer_formats) -> RecipeConfig:
    """MXFP8 E4M3 everywhere, 32-element blocks, with ``layer_formats`` (regex -> override)."""
    return preset("mxfp8_e4m3", layer_formats=dict(layer_formats))


def converted(cfg: RecipeConfig, model=None) -> tuple[QuantizedRecipe, torch.nn.Module]:
    model = tiny() if model is None else model
    rec = get_recipe(cfg)
    assert isinstance(rec, QuantizedRecipe)
    rec.resolve("cpu")
    rec.convert(model)
    return rec, model


def quantizers(model: torch.nn.Module) -> dict[str, LinearQuantizers]:
    return {n: m.quantizers for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def fmt(q) -> str:
    """The element format a role quantizer names (``"mx fp4_e2m1 1x32 ..."`` -> fp4_e2m1)."""
    return "high precision" if q is None else q.describe().split()[1]


def loss_and_grads(cfg: RecipeConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    _, model = converted(cfg)
    model.bfloat16()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 256, (2, 128), generator=g), torch.randint(0, 256, (2, 128), generator=g)
    loss = model(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------- which layer gets which formats


def test_override_gives_one_layer_fp4_wgrad_and_the_rest_fp8():
    rec, model = converted(mx(**{FC1: FP4_WGRAD}))
    qs = quantizers(model)
    assert len(qs) == 8
    for name, q in qs.items():
        wgrad = (fmt(q.wgrad_dy), fmt(q.input_wgrad))
        want = ("fp4_e2m1",) * 2 if name == "blocks.1.mlp.fc" else ("fp8_e4m3",) * 2
        assert wgrad == want, name
        assert (fmt(q.input), fmt(q.weight), fmt(q.grad_output), fmt(q.weight_dgrad)) == ("fp8_e4m3",) * 4
    assert qs["blocks.1.mlp.fc"].split_dy and not qs["blocks.0.mlp.fc"].split_dy
    d = rec.describe()
    assert d["layer_formats"] == {"blocks.1.mlp.fc": FP4_WGRAD}
    assert d["roles"]["input_wgrad"].startswith("mx fp8_e4m3 1x32"), "roles: the recipe's own formats"
    assert d["config"]["layer_formats"] == {FC1: FP4_WGRAD}


def test_first_matching_key_applies_and_same_resolves_after_the_override():
    layer_formats = {FC1: FP4_WGRAD, "mlp": {"input_format": "fp6_e3m2", "weight_dgrad_format": None}}
    rec, model = converted(mx(**layer_formats))
    qs = quantizers(model)
    fc1, mlp, attn = qs["blocks.1.mlp.fc"], qs["blocks.0.mlp.proj"], qs["blocks.0.attn.qkv"]
    assert (fmt(fc1.input), fmt(fc1.input_wgrad)) == ("fp8_e4m3", "fp4_e2m1")  # the first key only
    assert (fmt(mlp.input), fmt(mlp.input_wgrad)) == ("fp6_e3m2", "fp6_e3m2")  # `same` -> the override
    assert (fmt(mlp.weight), fmt(mlp.weight_dgrad)) == ("fp8_e4m3", "high precision")
    assert fmt(attn.input) == fmt(attn.input_wgrad) == "fp8_e4m3"
    # pure quantizers are shared per key: every MLP layer but blocks.1.mlp.fc has one set
    assert qs["blocks.0.mlp.fc"] is mlp is qs["blocks.1.mlp.proj"] and mlp is not attn
    assert qs["blocks.1.attn.proj"] is attn and fc1 not in (mlp, attn)
    assert set(rec.describe()["layer_formats"]) == {
        f"blocks.{i}.mlp.{m}" for i in (0, 1) for m in ("fc", "proj")
    }


def test_no_override_is_bit_identical():
    base_loss, base_grads = loss_and_grads(preset("mxfp8_e4m3"))
    empty = preset("mxfp8_e4m3", layer_formats={})
    # an override equal to the recipe's own fields takes the per-layer path, with the same bits
    echo = mx(mlp={"input_format": "fp8_e4m3", "input_wgrad_format": "same"})
    for cfg in (empty, echo):
        loss, grads = loss_and_grads(cfg)
        assert torch.equal(loss, base_loss) and list(grads) == list(base_grads)
        assert all(torch.equal(grads[n], base_grads[n]) for n in grads), cfg.layer_formats
    assert "layer_formats" not in converted(empty)[0].describe()


def test_wgrad_override_changes_only_that_layers_weight_gradient():
    base_loss, base_grads = loss_and_grads(preset("mxfp8_e4m3"))
    loss, grads = loss_and_grads(mx(**{FC1: FP4_WGRAD}))
    assert torch.equal(loss, base_loss)  # the forward and every dgrad are the recipe's
    changed = [n for n in grads if not torch.equal(grads[n], base_grads[n])]
    assert changed == ["blocks.1.mlp.fc.weight"]


def test_override_does_not_convert_a_kept_layer_or_touch_attention():
    cfg = mx(attn={"input_format": "fp6_e3m2"})  # "attn" also matches blocks.1.attn.core
    rec, model = converted(dataclasses.replace(cfg, keep_first_blocks=1, quantize_attention=True))
    assert not isinstance(model.blocks[0].attn.qkv, QuantLinear)
    assert set(rec.describe()["layer_formats"]) == {"blocks.1.attn.qkv", "blocks.1.attn.proj"}
    assert fmt(model.blocks[1].attn.qkv.quantizers.input) == "fp6_e3m2"
    core = model.blocks[1].attn.core
    assert fmt(core.qk.a) == fmt(core.pv.b) == fmt(core.qk.a_bwd) == "fp8_e4m3"


def test_keys_match_as_the_layer_filter_does():
    """One matching rule: a key selects exactly the layers it would keep as a skip regex."""
    names = [n for n, m in meta_model(n_layers=12).named_modules() if isinstance(m, torch.nn.Linear)]
    for key in ("blocks.1", r"mlp\.fc", r"^blocks\.1\.", "attn", "fc$"):
        cfg = mx(**{key: FP4_WGRAD})
        kept = select_modules(names, skip=[key]).kept
        assert [n for n in names if layer_override(cfg, n)[0] == key] == kept, key


# ---------------------------------------------------------------- validation: one line, recipe.layer_formats


def check_error(cfg: RecipeConfig, model=None) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        get_recipe(cfg).check(meta_model() if model is None else model)
    assert e.value.key == "recipe.layer_formats", (e.value.key, e.value.fix)
    assert "\n" not in e.value.one_line()
    return e.value


@pytest.mark.parametrize(
    "layer_formats,text",
    [
        ({"(": FP4_WGRAD}, "not a valid regex"),
        (
            {"mlp": {"input_wgrad": "fp4_e2m1"}},
            f"not a role format field; map some of {', '.join(ROLE_FORMAT_FIELDS)}",
        ),
        ({"mlp": {"input_wgrad_format": "fp5"}}, "recipe.input_wgrad_format=fp5: unknown MX element format"),
        ({"mlp": {"input_format": "same"}}, "recipe.input_format=same: unknown MX element format"),
        (
            {r"^blocks\.1\.mlp\.fcc$": FP4_WGRAD},
            "matches no converted Linear layer; they are named like blocks.0",
        ),
        ({"lm_head": FP4_WGRAD}, "only layers kept in high precision (lm_head)"),
        ({"mlp": FP4_WGRAD, FC1: FP4_WGRAD}, "takes an earlier key's override"),
    ],
    ids=["regex", "field", "format", "same_forward", "typo", "kept_only", "shadowed"],
)
def test_bad_layer_formats_are_one_line_errors(layer_formats, text):
    e = check_error(mx(**layer_formats))
    assert text in e.fix, e.fix


def test_fp8_override_formats_follow_fp8_format():
    e = check_error(preset("fp8_current", layer_formats={"mlp": {"grad_output_format": "fp8_e4m3"}}))
    assert "recipe.fp8_format=HYBRID gives fp8_e5m2" in e.fix
    get_recipe(preset("fp8_current", layer_formats={"mlp": {"grad_output_format": None}})).check(meta_model())


@pytest.mark.parametrize("backend", ["torch", "te"])
def test_hardware_backends_refuse_layer_formats(backend):
    cfg = preset("fp8_current", layer_formats={FC1: {"input_format": None}})
    with pytest.raises(ConfigError) as e:
        get_recipe(dataclasses.replace(cfg, backend=backend)).resolve("cpu")
    assert e.value.key == "recipe.layer_formats" and "\n" not in e.value.one_line()
    assert (
        e.value.fix.startswith("recipe.layer_formats is emulated-only")
        and "recipe.backend=emulated" in e.value.fix
    )
    assert get_recipe(cfg).resolve_backend("cpu")[0] == "emulated"  # auto


# ---------------------------------------------------------------- a YAML preset, through the entry point

PRESET = r"""# MXFP8 E4M3 with FP4 wgrad operands in one MLP layer.
defaults: [_schema, _self_]
name: planted
quantizer: mx
input_format: fp8_e4m3
weight_format: fp8_e4m3
grad_output_format: fp8_e4m3
block_size: 32
layer_formats:
  '^blocks\.1\.mlp\.fc$': {grad_output_wgrad_format: fp4_e2m1, input_wgrad_format: fp4_e2m1}
"""


def conf_with(tmp_path: Path, text: str) -> Path:
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    (conf / "recipe" / "planted.yaml").write_text(text)
    return conf


def test_preset_with_layer_formats_trains(tmp_path: Path):
    args = ["--config-dir", str(conf_with(tmp_path, PRESET)), "+recipe=planted", "trainer.max_steps=3"]
    args += ["logger=none", "trainer.checkpoint_every=0", "stats.every=0", "trainer.eval_sequences=16"]
    res = run_lowbit(args, run_dir=tmp_path / "run")
    assert res.proc.returncode == 0
    run = res.run_config
    assert run["config"]["recipe"]["layer_formats"] == {FC1: FP4_WGRAD}
    assert run["resolved"]["recipe"]["layer_formats"] == {"blocks.1.mlp.fc": FP4_WGRAD}
    assert res.metrics[-1]["step"] == 3


def test_preset_typo_is_one_line_exit_2(tmp_path: Path):
    conf = conf_with(tmp_path, PRESET.replace(r"mlp\.fc$", r"mlp\.fcc$"))
    res = run_lowbit(["--config-dir", str(conf), "+recipe=planted"], run_dir=tmp_path / "run", check=False)
    lines = [line for line in res.proc.stderr.splitlines() if line.strip()]
    assert res.proc.returncode == 2 and len(lines) == 1, res.proc.stderr
    want = r"lowbit: config error: recipe.layer_formats=^blocks\.1\.mlp\.fcc$: it matches no converted"
    assert lines[0].startswith(want), lines[0]
