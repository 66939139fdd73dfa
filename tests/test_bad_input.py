"""Every bad input of the issue's list, in one table, through the checks ``train/run.py`` makes
before ``launch`` (in-process: no subprocess, no process group, no model beyond the meta device).

Each row must end in one ``ConfigError`` naming the key, printed as ``lowbit: config error:
<key>=<value>: <fix>``, within seconds. The exit code 2 path through the real entry point is
covered for some rows by subprocess tests elsewhere (``test_config``, ``test_reliability``,
``test_recipes_runs``). A row marked ``xfail(strict=True)`` documents a check that belongs in a
file outside ``train/validate.py``; it turns into a failure the day that check lands, so the mark
must then be dropped.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from recipes.errors import ConfigError
from train import distenv
from train.cli import compose, preflight
from train.rundir import resume_layout_problem
from train.validate import validate

#: seconds a bad input may take to be refused (the rule: "within seconds")
LIMIT_S = 10.0
TE_INSTALLED = importlib.util.find_spec("transformer_engine") is not None


class Case(NamedTuple):
    id: str
    overrides: list[str]
    """argv of ``python train/run.py``; ``{tmp}`` is the test's tmp_path."""
    world_size: int | None
    """None: a plain ``python train/run.py`` (ranks: launcher.nproc_per_node); N: started by a
    launcher (torchrun, srun) as one of N ranks."""
    key: str
    value: str
    fix: str
    """A substring of the expected fix."""
    env: dict[str, str] = {}
    marks: tuple = ()


CASES = [
    Case("unknown_model", ["model=nope"], None, "model", "nope", "unknown model; choose one of: 1.3b"),
    Case("unknown_recipe", ["+recipe=nope"], None, "recipe", "nope", "unknown recipe; choose one of: bf16"),
    Case("unknown_parallel", ["parallel=nope"], None, "parallel", "nope", "choose one of: ddp, single"),
    Case("fp16_on_cpu", ["+recipe=fp16", "trainer.device=cpu"], None, "recipe.precision", "fp16",
         "use +recipe=bf16 or run on a GPU"),
    Case("batch_vs_world_launcher", ["parallel=ddp", "trainer.global_batch_size=16"], 3,
         "trainer.global_batch_size", "16", "5 x 3 = 15"),
    Case("batch_vs_world_nproc", ["parallel=zero2", "launcher.nproc_per_node=2", "trainer.global_batch_size=16",
                                  "trainer.micro_batch_size=3"], None,
         "trainer.global_batch_size", "16", "3 x 2 = 6"),
    Case("lr_zero", ["trainer.lr=0"], None, "trainer.lr", "0.0", "must be > 0"),
    Case("lr_negative", ["trainer.lr=-1e-3"], None, "trainer.lr", "-0.001", "must be > 0"),
    Case("max_steps_zero", ["trainer.max_steps=0"], None, "trainer.max_steps", "0", "must be >= 1"),
    Case("global_batch_zero", ["trainer.global_batch_size=0"], None, "trainer.global_batch_size", "0",
         "must be >= 1"),
    Case("global_batch_negative", ["trainer.global_batch_size=-4"], None, "trainer.global_batch_size", "-4",
         "must be >= 1"),
    Case("mx_block_not_power_of_two", ["+recipe=mxfp8_e4m3", "recipe.block_size=24"], None,
         "recipe.block_size", "24", "must be a power of two"),
    Case("mx_block_vs_layer_dims", ["+recipe=mxfp8_e4m3", "recipe.block_size=256"], None,
         "recipe.block_size", "256", "must divide every converted layer's reduction dims"),
    Case("data_path_ignored_by_shakespeare", ["data.path=/nonexistent"], None, "data.path", "/nonexistent",
         "is read only with data=files"),
    Case("data_file_missing", ["data=files", "data.path=/nonexistent/x.txt"], None, "data.path",
         "/nonexistent/x.txt", "no such file or directory"),
    Case("data_file_empty", ["data=files", "data.path={tmp}/empty.txt"], None, "data.path",
         "{tmp}/empty.txt", "the file is empty"),
    Case("single_with_two_procs", ["parallel=single", "launcher.nproc_per_node=2"], None, "parallel", "single",
         "use parallel=ddp|zero1|zero2|zero3"),
    Case("slurm_sweep_without_sbatch", ["-m", "hydra/launcher=slurm"], None, "hydra/launcher", "slurm",
         "sbatch is not on PATH", env={"PATH": "{tmp}"}),
    Case("slurm_launcher_without_multirun", ["hydra/launcher=slurm"], None, "hydra/launcher", "slurm", "add -m"),
    Case("te_backend_without_te", ["+recipe=mxfp8", "recipe.backend=te"], None, "recipe.backend", "te",
         "Transformer Engine", marks=(pytest.mark.skipif(TE_INSTALLED, reason="Transformer Engine is installed"),)),
    Case("te_backend_on_plain_recipe", ["recipe.backend=te"], None, "recipe.backend", "te",
         "recipe bf16 has no te backend"),
    Case("on_nonfinite_unknown", ["trainer.on_nonfinite=explode"], None, "trainer.on_nonfinite", "explode",
         "use one of: stop, skip, log"),
    Case("keep_checkpoints_negative", ["trainer.keep_checkpoints=-1"], None, "trainer.keep_checkpoints", "-1",
         "must be >= 0"),
    Case("lockstep_reference_precision", ["reference.mode=lockstep", "reference.precision=fp16"], None,
         "reference.precision", "fp16", "use one of: bf16, fp32"),
    Case("stats_family_unknown", ["stats.families=[grad,gemms]"], None, "stats.families", "gemms",
         "use some of: grad, act"),
    Case("stats_layers_bad_regex", ["stats.layers=['blocks.(0']"], None, "stats.layers", "blocks.(0",
         "not a regular expression"),
    Case("stats_end_negative", ["stats.end_step=-5"], None, "stats.end_step", "-5", "must be >= 0"),
    Case("stats_inspect_missing", ["stats.inspect_config={tmp}/nope.yaml"], None, "stats.inspect_config",
         "{tmp}/nope.yaml", "cannot read it as YAML"),
    Case("stats_inspect_numerics_feature", ["stats.inspect_config={tmp}/disable.yaml"], None,
         "stats.inspect_config", "{tmp}/disable.yaml (section.DisableFP8GEMM)", "changes numerics"),
    Case("hadamard_tokens", ["+recipe=nvfp4", "model.seq_len=100", "trainer.micro_batch_size=1",
                             "trainer.global_batch_size=1"], None,
         "recipe.wgrad_hadamard", "True", "100 per micro-batch"),
    Case("nvfp4_order_unknown", ["+recipe=nvfp4", "recipe.nvfp4_scale_order=ieee"], None,
         "recipe.nvfp4_scale_order", "ieee", "use one of te, torchao"),
    Case("emulated_gemm_unknown", ["+recipe=mxfp8_e4m3", "recipe.emulated_gemm=fp16"], None,
         "recipe.emulated_gemm", "fp16", "use auto, codes, bf16 (where exact) or fp32"),
    Case("nvfp4_order_on_mx", ["+recipe=mxfp8_e4m3", "recipe.nvfp4_scale_order=torchao"], None,
         "recipe.nvfp4_scale_order", "torchao", "only NVFP4 has two scale orders"),
    Case("host_malloc_unknown", ["launcher.host_malloc=jemalloc"], None,
         "launcher.host_malloc", "jemalloc", "use one of auto, tuned, default"),
]  # fmt: skip


def pre_start_up(argv: list[str], *, world_size: int | None, run_dir: Path) -> None:
    """What ``python train/run.py ARGV`` runs before ``launch``: ``preflight`` (group choices,
    output dirs, one compose) in ``__main__``, then in ``main`` the typed config (``compose`` is
    Hydra's compose + ``to_run_config``), the world size, ``validate`` and the resume layout."""
    preflight(argv)
    cfg = compose([a for a in argv if not a.startswith("-")])
    denv = distenv.detect({"RANK": "0", "WORLD_SIZE": str(world_size)} if world_size else {})
    world = denv.world_size if denv.world_size > 1 else cfg.launcher.nproc_per_node  # as train/run.py
    plan = validate(cfg, world_size=world)
    stage = cfg.parallel.zero_stage
    if why := resume_layout_problem(
        run_dir, cfg.trainer.resume, world_size=plan.world_size, zero_stage=stage
    ):
        raise why


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_is_one_config_error_before_start_up(case: Case, tmp_path: Path, monkeypatch):
    for name in [n for n in os.environ if n.startswith("SLURM_") or n in ("RANK", "WORLD_SIZE")]:
        monkeypatch.delenv(name)  # the row's world size alone decides the topology
    for name, val in case.env.items():
        monkeypatch.setenv(name, val.format(tmp=tmp_path))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "disable.yaml").write_text(
        "section:\n  enabled: true\n  layers: {layer_types: [qkv]}\n"
        "  transformer_engine:\n    DisableFP8GEMM: {enabled: true, gemms: [wgrad]}\n"
    )
    argv = [a.format(tmp=tmp_path) for a in case.overrides]
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        pre_start_up(argv, world_size=case.world_size, run_dir=tmp_path / "run")
    elapsed = time.perf_counter() - start
    err, line = info.value, info.value.one_line()
    assert err.key == case.key, line
    assert line.startswith(f"lowbit: config error: {case.key}={case.value.format(tmp=tmp_path)}: "), line
    assert case.fix in err.fix and "\n" not in line, line
    assert elapsed < LIMIT_S, f"{elapsed:.1f} s to refuse {argv}"
    assert not (tmp_path / "run").exists()
