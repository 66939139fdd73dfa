"""Hydra composition of every preset, typed conversion, validation, and one-line CLI errors."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from recipes.errors import ConfigError
from train.cli import compose
from train.config import RunConfig
from train.validate import validate

from .conftest import ROOT, run_lowbit

CONF = ROOT / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_run(overrides: list[str]) -> RunConfig:
    return compose(overrides)


def test_groups_present():
    assert options("model") == sorted(["tiny", "20m", "125m", "350m", "760m", "1.3b", "2.7b", "6.7b", "13b"])
    assert options("parallel") == sorted(["single", "ddp", "zero1", "zero2", "zero3", "zero3_offload"])
    assert {"fp32", "bf16", "fp16"} <= set(options("recipe"))


def test_default_is_tiny_bf16_on_shakespeare():
    cfg = compose_run([])
    assert (cfg.model.name, cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.seq_len) == (
        "tiny",
        128,
        2,
        4,
        128,
    )
    assert cfg.model.mlp == "gelu" and cfg.model.ffn_mult == 4.0
    assert cfg.recipe.name == "bf16" and cfg.recipe.precision == "bf16"
    t = cfg.trainer
    assert (
        t.lr,
        t.beta1,
        t.beta2,
        t.weight_decay,
        t.warmup_frac,
        t.min_lr_ratio,
        t.grad_clip,
        t.global_batch_size,
    ) == (1e-3, 0.9, 0.95, 0.1, 0.05, 0.1, 1.0, 16)
    assert cfg.data.source == "shakespeare" and cfg.trainer.eval_every == 50


@pytest.mark.parametrize("model", options("model"))
def test_every_model_composes_and_validates(model):
    cfg = compose_run([f"model={model}"])
    assert cfg.model.name == model
    validate(cfg, world_size=1)


@pytest.mark.parametrize("parallel", options("parallel"))
def test_every_parallel_composes_and_validates(parallel):
    cfg = compose_run([f"parallel={parallel}"])
    validate(cfg, world_size=1 if parallel == "single" else 2)


def schema_defaults() -> dict:
    from recipes.config import RecipeConfig

    return {f.name: getattr(RecipeConfig(), f.name) for f in dataclasses.fields(RecipeConfig)}


@pytest.mark.parametrize("recipe", options("recipe"))
def test_every_recipe_is_a_delta_that_composes_and_validates(recipe):
    """Each conf/recipe/NAME.yaml starts from `_schema` (every RecipeConfig field at its default) and
    sets only the fields that differ, so `+recipe=NAME` is exactly the schema defaults plus the deltas."""
    import yaml

    from recipes.config import RecipeConfig

    raw = yaml.safe_load((CONF / "recipe" / f"{recipe}.yaml").read_text())
    assert raw.pop("defaults") == ["_schema", "_self_"], f"{recipe}.yaml must start from the schema"
    defaults = schema_defaults()
    for key, value in raw.items():
        assert key in defaults, f"{recipe}.yaml: {key} is not a RecipeConfig field"
        assert value != defaults[key], f"{recipe}.yaml: {key}: {value!r} is the schema default; drop it"
    cfg = compose_run([f"+recipe={recipe}"])
    assert cfg.recipe == RecipeConfig(**raw)
    if cfg.recipe.precision == "fp16":  # DeepSpeed refuses fp16 on its CPU accelerator
        with pytest.raises(ConfigError) as e:
            validate(compose_run([f"+recipe={recipe}", "trainer.device=cpu"]), world_size=1)
        assert e.value.key == "recipe.precision"
    else:
        validate(cfg, world_size=1)


def test_no_recipe_is_the_schema_defaults_and_schema_is_not_a_choice():
    from recipes.config import RecipeConfig

    assert compose_run([]).recipe == RecipeConfig() == compose_run(["+recipe=bf16"]).recipe
    assert "_schema" not in options("recipe")
    with pytest.raises(ConfigError) as e:
        compose_run(["+recipe=_schema"])
    assert e.value.key == "recipe" and "_schema" not in e.value.fix


def test_recipe_never_inherits_values_set_before_it(tmp_path: Path):
    """An experiment that sets recipe fields is composed before `+recipe=`; the preset resets them."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "experiment" / "sets_recipe.yaml").write_text(
        "# @package _global_\nrecipe:\n  block_size: 64\n  skip_modules: [lm_head, mlp]\n"
    )
    cfg = compose(["experiment=sets_recipe"], conf_dir=conf)
    assert cfg.recipe.block_size == 64 and cfg.recipe.skip_modules == ["lm_head", "mlp"]
    cfg = compose(["experiment=sets_recipe", "+recipe=mxfp8_e4m3"], conf_dir=conf)
    assert cfg.recipe == compose_run(["+recipe=mxfp8_e4m3"]).recipe
    assert cfg.recipe.block_size == 32 and cfg.recipe.skip_modules == ["lm_head"]


def test_recipe_override_replaces_default():
    cfg = compose_run(["+recipe=fp32"])
    assert cfg.recipe.precision == "fp32"


def test_a_new_preset_is_one_yaml(tmp_path: Path):
    """A preset is data: one file in a copy of conf/ (Hydra's --config-dir) trains, no code touched."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "recipe" / "mxfp6_b16.yaml").write_text(
        "# MX FP6 E3M2 in 16-element blocks.\n"
        "defaults: [_schema, _self_]\n"
        "name: mxfp6_b16\n"
        "quantizer: mx\n"
        "input_format: fp6_e3m2\n"
        "weight_format: fp6_e3m2\n"
        "grad_output_format: fp6_e3m2\n"
        "block_size: 16\n"
    )
    args = ["--config-dir", str(conf), "+recipe=mxfp6_b16", "trainer.max_steps=2"]
    res = run_lowbit([*args, "trainer.eval_sequences=16", "logger=none"], run_dir=tmp_path / "run")
    rec = res.run_config["resolved"]["recipe"]
    cfg = res.run_config["config"]["recipe"]
    assert cfg["name"] == "mxfp6_b16" and cfg["block_size"] == 16 and cfg["input_format"] == "fp6_e3m2"
    assert rec["conversion"].startswith("converted 8/9 Linear") and len(rec["converted"]) == 8
    assert res.metrics[-1]["step"] == 2


def test_schema_rejects_unknown_keys_and_bad_types():
    with pytest.raises(ConfigError) as e:
        compose_run(["trainer.not_a_key=1"])
    assert e.value.key == "trainer.not_a_key"
    with pytest.raises(ConfigError) as e:
        compose_run(["trainer.max_steps=abc"])
    assert e.value.key == "trainer.max_steps" and e.value.value == "abc"


def test_gpt3_presets_have_paper_shapes():
    import torch

    from train.model import GPT, count_params

    expected = {"125m": 125e6, "350m": 350e6, "760m": 760e6, "1.3b": 1.3e9, "2.7b": 2.7e9}
    for name, n in expected.items():
        cfg = compose_run([f"model={name}"])
        with torch.device("meta"):
            model = GPT(cfg.model, vocab_size=50257)
        assert abs(count_params(model) - n) / n < 0.06, (name, count_params(model))


def test_validation_errors_name_the_key():
    cfg = compose_run(["trainer.global_batch_size=16", "trainer.micro_batch_size=3"])
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=2)
    assert e.value.key == "trainer.global_batch_size" and "3 x 2 = 6" in e.value.fix
    with pytest.raises(ConfigError) as e:
        validate(compose_run(["+recipe=fp16", "trainer.device=cpu"]), world_size=1)
    assert e.value.key == "recipe.precision" and "CPU" in e.value.fix
    with pytest.raises(ConfigError) as e:
        validate(compose_run([]), world_size=2)
    assert e.value.key == "parallel"


BAD_COMMANDS = [
    (["model=nope"], "model=nope"),
    (
        [
            "parallel=zero2",
            "launcher.nproc_per_node=2",
            "trainer.global_batch_size=16",
            "trainer.micro_batch_size=3",
        ],
        "trainer.global_batch_size=16",
    ),
    (["data=files", "data.path=/no/such/corpus.txt"], "data.path=/no/such/corpus.txt"),
    (["+recipe=fp16"], "recipe.precision=fp16"),
    (["trainer.max_steps=abc"], "trainer.max_steps=abc"),
    (["trainer.bogus=1"], "trainer.bogus=1"),
    (["+recipe=nope"], "recipe=nope"),
]


@pytest.mark.parametrize("args,prefix", BAD_COMMANDS, ids=[a[0][-1] for a in BAD_COMMANDS])
def test_bad_input_is_one_line_exit_2(args, prefix, tmp_path: Path):
    res = run_lowbit(args, run_dir=tmp_path / "run", check=False, timeout=120)
    assert res.proc.returncode == 2, res.proc.stderr
    lines = [line for line in res.proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.proc.stderr
    assert lines[0].startswith(f"lowbit: config error: {prefix}:"), lines[0]
    assert "Traceback" not in res.proc.stderr + res.proc.stdout
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_presets_on_a_search_path_are_choices(tmp_path: Path):
    """`hydra.searchpath=[file://DIR]` adds DIR/recipe/*.yaml (train.sensitivity writes its presets there)."""
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "mine.yaml").write_text(
        "defaults: [_schema, _self_]\nname: mine\nprecision: fp32\n"
    )
    cfg = compose_run([f"hydra.searchpath=[file://{tmp_path}]", "+recipe=mine"])
    assert cfg.recipe.name == "mine" and cfg.recipe.precision == "fp32"
    with pytest.raises(ConfigError) as e:
        compose_run([f"hydra.searchpath=[file://{tmp_path}]", "+recipe=nope"])
    assert e.value.key == "recipe" and "mine" in e.value.fix and "mxfp4_e2m1" in e.value.fix


def test_host_malloc_modes_are_checked_and_applied():
    """launcher.host_malloc: an unknown mode is a config error; tuned and auto set glibc's
    thresholds (``apply`` raises if mallopt refuses) and say so; default leaves them alone."""
    from recipes.errors import ConfigError
    from train import hostmem

    with pytest.raises(ConfigError) as e:
        hostmem.check("jemalloc")
    assert (e.value.key, e.value.value) == ("launcher.host_malloc", "jemalloc")
    assert "defaults" in hostmem.apply("default")
    if hostmem.glibc() is None:
        pytest.skip("no glibc on this machine: tuned is refused there (tested by check above)")
    assert "1 GiB" in hostmem.apply("tuned") and "1 GiB" in hostmem.apply("auto")


@pytest.mark.parametrize("mode,kept", [("default", False), ("tuned", True)])
def test_tuned_host_malloc_keeps_a_freed_large_tensor_in_the_process(mode, kept):
    """The effect itself, in a fresh process: a 256 MiB tensor, touched then freed, leaves the
    resident set (glibc's default unmaps it; tuned keeps it for the next allocation)."""
    import subprocess
    import sys

    from tests.conftest import ROOT
    from train import hostmem

    if hostmem.glibc() is None:
        pytest.skip("no glibc on this machine")
    code = (
        "import os, torch\nfrom train import hostmem\n"
        f"hostmem.apply({mode!r})\n"
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
        "x = torch.ones(64 << 20)\nbefore_free = rss()\ndel x\nprint((before_free - rss()) / 2**20)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    released_mib = float(out.stdout.strip().splitlines()[-1])
    assert (released_mib < 16) if kept else (released_mib > 200), released_mib
