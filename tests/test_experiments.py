"""conf/experiment/*.yaml: each composes and validates, sets what it says, and loses to the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from recipes.errors import ConfigError
from train.cli import compose
from train.validate import validate

from .conftest import ROOT, run_lowbit

CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
SHORT = ["trainer.max_steps=2", "trainer.eval_sequences=16", "logger=none"]


def sweeper_params(overrides: list[str]) -> dict[str, str]:
    """``hydra.sweeper.params`` as ``-m`` would see it (``compose`` drops the hydra node)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from train.cli import register_resolvers
    from train.config import register_configs

    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
    return dict(cfg.hydra.sweeper.params or {})


def test_experiments_present():
    assert {"debug", "fp8_vs_bf16_125m", "mx_formats_tiny"} <= set(EXPERIMENTS)
    for name in EXPERIMENTS:
        assert (CONF / "experiment" / f"{name}.yaml").read_text().startswith("# @package _global_\n"), name


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment):
    validate(compose([f"experiment={experiment}"]), world_size=1)


def test_unknown_experiment_is_an_error():
    with pytest.raises(ConfigError) as e:
        compose(["experiment=nope"])
    assert e.value.key == "experiment"


def test_fp8_vs_bf16_125m_is_the_fp8_run_with_a_lockstep_bf16_reference():
    cfg = compose(["experiment=fp8_vs_bf16_125m"])
    assert cfg.recipe == compose(["+recipe=fp8_delayed"]).recipe
    assert cfg.model == compose(["model=125m"]).model
    assert cfg.trainer.lr == 6e-4 and cfg.trainer.global_batch_size == 256  # the 125m preset's
    assert (cfg.reference.mode, cfg.reference.precision) == ("lockstep", "bf16")
    # the BF16 side as a run of its own (the comment in the file): `recipe=`, the group is in the tree
    bf16 = compose(["experiment=fp8_vs_bf16_125m", "recipe=bf16", "reference.mode=none"])
    assert bf16.recipe == compose([]).recipe and bf16.reference.mode == "none" and bf16.model.name == "125m"
    with pytest.raises(ConfigError, match="Multiple values for recipe"):
        compose(["experiment=fp8_vs_bf16_125m", "+recipe=bf16"])


def test_command_line_overrides_win_over_the_experiment():
    cfg = compose(["experiment=fp8_vs_bf16_125m", "model=tiny", "recipe.margin=2", "reference.mode=none"])
    assert (cfg.model.name, cfg.recipe.name, cfg.recipe.margin, cfg.reference.mode) == (
        "tiny",
        "fp8_delayed",
        2,
        "none",
    )
    cfg = compose(["experiment=debug", "trainer.max_steps=7", "stats.every=3", "+recipe=nvfp4"])
    assert (cfg.trainer.max_steps, cfg.stats.every, cfg.trainer.log_every) == (7, 3, 1)
    assert cfg.recipe == compose(["+recipe=nvfp4"]).recipe


def test_debug_is_short_and_verbose():
    cfg = compose(["experiment=debug"])
    t = cfg.trainer
    assert (t.max_steps, t.log_every, t.eval_every, t.eval_sequences, t.resume) == (5, 1, 5, 16, "none")
    assert cfg.stats.every == 1 and not cfg.logger.wandb.enabled and cfg.logger.console
    assert cfg.recipe == compose([]).recipe and cfg.model.name == "tiny"


def test_mx_formats_tiny_sweeps_existing_mx_presets():
    params = sweeper_params(["experiment=mx_formats_tiny"])
    presets = params["+recipe"].split(",")
    assert presets[0] == "bf16" and len(presets) >= 4
    for name in presets:
        assert (CONF / "recipe" / f"{name}.yaml").is_file(), name
        cfg = compose(["experiment=mx_formats_tiny", f"+recipe={name}"])
        assert cfg.model.name == "tiny" and cfg.recipe.name == name
        assert cfg.recipe.quantizer == ("none" if name == "bf16" else "mx")
    assert sweeper_params([]) == {}  # only the experiment defines a sweep


def test_mx_formats_tiny_multirun_subset_from_the_command_line(tmp_path: Path):
    """`-m experiment=mx_formats_tiny +recipe=a,b`: the command line replaces the file's sweep list."""
    sweep = tmp_path / "sweep"
    args = ["-m", "experiment=mx_formats_tiny", "+recipe=bf16,mxfp4_e2m1", *SHORT, f"hydra.sweep.dir={sweep}"]
    res = run_lowbit(args, timeout=300)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"], res.proc.stdout[-2000:]
    names = [yaml.safe_load((p / "run_config.yaml").read_text())["config"]["recipe"]["name"] for p in jobs]
    assert names == ["bf16", "mxfp4_e2m1"]


def test_recipe_sweep_is_five_recipes_by_three_seeds():
    """The team-review preset: the issue's standard comparison (15 runs x 400 steps at tiny scale)."""
    params = sweeper_params(["experiment=recipe_sweep"])
    presets = params["+recipe"].split(",")
    assert presets == ["bf16", "mxfp8_e4m3", "mxfp4_e2m1", "fp8_delayed", "nvfp4"]
    assert params["trainer.seed"].split(",") == ["1", "2", "3"]
    for name in presets:
        cfg = compose(["experiment=recipe_sweep", f"+recipe={name}", "trainer.seed=2"])
        assert cfg.recipe.name == name and cfg.model.name == "tiny" and cfg.trainer.max_steps == 400
        assert cfg.trainer.seed == 2 and "recipe_sweep" in cfg.logger.wandb.tags
