"""End-to-end runs of the real entry point: real Hydra, real DeepSpeed (CPU, gloo), real W&B offline files.

Expensive runs are module fixtures shared by several tests.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.wandb_offline import find_run_files, read_run

from .conftest import ROOT, RunResult, read_jsonl, run_lowbit
from .golden import OTHER_MACHINE_LOSS_ATOL, same_machine

STEPS = 20
COMMON = [
    f"trainer.max_steps={STEPS}",
    "trainer.log_every=1",
    "trainer.eval_every=10",
    "trainer.eval_sequences=32",
]
GOLDEN = ROOT / "tests" / "assets" / "losses"


def assert_trains(res: RunResult, steps: int = STEPS) -> None:
    m = res.metrics
    assert [r["step"] for r in m] == list(range(1, steps + 1))
    for key in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/step_time_s"):
        assert all(math.isfinite(r[key]) for r in m), key
    first, last = m[0]["train/loss"], m[-1]["train/loss"]
    assert last < first - 0.5, (first, last)
    assert "val/loss" in m[-1] and "val/loss" in m[9] and "val/loss" not in m[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for name, args in {
        "fp32": ["parallel=single", "+recipe=fp32"],
        "bf16": ["parallel=single", "+recipe=bf16"],
    }.items():
        out[name] = run_lowbit([*args, *COMMON], run_dir=base / name)
    return out


def test_single_process_runs_train(runs):
    for res in runs.values():
        assert_trains(res)


def test_init_weights_and_data_order_do_not_depend_on_recipe(runs):
    fp = {k: r.run_config["fingerprints"] for k, r in runs.items()}
    assert fp["fp32"] == fp["bf16"]
    assert runs["fp32"].metrics[0]["train/loss"] == pytest.approx(
        runs["bf16"].metrics[0]["train/loss"], abs=0.02
    )


def test_run_config_records_resolved_config_and_environment(runs):
    rc = runs["bf16"].run_config
    assert rc["config"]["recipe"]["precision"] == "bf16"
    assert rc["resolved"]["recipe"]["resolved_backend"] == "native"
    assert rc["resolved"]["world_size"] == 1 and rc["resolved"]["device"] == "cpu"
    assert rc["env"]["packages"]["torch"] and rc["env"]["packages"]["deepspeed"]
    assert "git_sha" in rc["env"] and rc["env"]["cpu"]
    assert (runs["bf16"].run_dir / ".hydra" / "config.yaml").exists()


def test_wandb_offline_run_matches_metrics_jsonl(runs):
    res = runs["bf16"]
    files = find_run_files(res.run_dir)
    assert len(files) == 1
    wb = read_run(files[0])
    assert wb["exit_code"] == 0
    c = res.run_config["config"]
    # named by what it is, tagged with the recipe's name, kind, formats, backend, model, parallelism
    assert wb["run"]["project"] == "lowbit"
    assert wb["run"]["name"] == f"tiny-bf16-native-zero0-s{c['trainer']['seed']}", wb["run"]["name"]
    assert wb["run"]["tags"] == ["bf16", "native", "tiny", "single"], wb["run"]["tags"]
    assert wb["config"]["config"] == res.run_config["config"]
    assert wb["config"]["fingerprints"] == res.run_config["fingerprints"]
    hist = [{k: v for k, v in row.items() if not k.startswith("_")} for row in wb["history"]]
    assert hist == res.metrics
    assert wb["summary"]["final/train_loss"] == res.metrics[-1]["train/loss"]


def _golden_check(res: RunResult, name: str) -> None:
    """A change not meant to touch numerics reproduces the golden loss curve exactly."""
    path = GOLDEN / f"{name}.json"
    got = [r["train/loss"] for r in res.metrics]
    golden = json.loads(path.read_text())
    assert golden["command"] == COMMON_GOLDEN[name]
    if not same_machine(golden):  # bits depend on the CPU kind (tests/golden.py:machine_signature)
        assert got == pytest.approx(golden["losses"], abs=OTHER_MACHINE_LOSS_ATOL)
        return
    assert got == golden["losses"], (
        "loss curve moved: if the change is meant to touch numerics, regenerate with python -m scripts.update_golden"
    )


COMMON_GOLDEN = {
    "tiny_fp32": "parallel=single +recipe=fp32 " + " ".join(COMMON),
    "tiny_bf16": "parallel=single +recipe=bf16 " + " ".join(COMMON),
}


def test_golden_loss_curves(runs):
    _golden_check(runs["fp32"], "tiny_fp32")
    _golden_check(runs["bf16"], "tiny_bf16")


@pytest.mark.dist
@pytest.mark.parametrize(
    "parallel,recipe",
    [("ddp", "fp32"), ("zero1", "bf16"), ("zero2", "fp32"), ("zero3", "bf16")],
)
def test_two_process_deepspeed(parallel, recipe, runs, tmp_path):
    args = [f"parallel={parallel}", f"+recipe={recipe}", "launcher.nproc_per_node=2", *COMMON]
    res = run_lowbit([*args, f"trainer.checkpoint_every={STEPS}"], run_dir=tmp_path)
    assert_trains(res)
    rc = res.run_config
    assert rc["resolved"]["world_size"] == 2 and rc["resolved"]["launcher"] == "lowbit"
    assert rc["fingerprints"] == runs[recipe].run_config["fingerprints"]
    ref = runs[recipe].losses()
    got = res.losses()
    # the same global batches whatever the world size: curves agree up to reduction order
    tol = 1e-4 if recipe == "fp32" else 2e-2
    assert max(abs(got[s] - ref[s]) for s in ref) < tol
    assert len(list((tmp_path).glob("metrics.jsonl"))) == 1 and len(find_run_files(tmp_path)) == 1
    # python -m train.export: the FP32 master weights of this ZeRO stage's 2-rank checkpoint, loaded
    # without DeepSpeed into train.model under the same recipe and dtype, give the run's val loss
    # (one process, so the evaluation batches differ from the run's two: float tolerance only)
    out = subprocess.run([sys.executable, "-m", "train.export", str(tmp_path), "--eval"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    val = float(out.stdout.split("val/loss ")[1])
    assert val == pytest.approx(res.metrics[-1]["val/loss"], abs=1e-5 if recipe == "fp32" else 5e-3)
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values())
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert (cfg["world_size"], cfg["step"], cfg["recipe"]) == (2, STEPS, recipe)


@pytest.mark.dist
def test_runs_under_torchrun(runs, tmp_path):
    res = run_lowbit(
        ["parallel=zero2", "+recipe=fp32", *COMMON],
        run_dir=tmp_path,
        launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
    )
    assert_trains(res)
    assert (
        res.run_config["resolved"]["launcher"] == "torchrun" and res.run_config["resolved"]["world_size"] == 2
    )
    ref = runs["fp32"].losses()
    assert max(abs(res.losses()[s] - ref[s]) for s in ref) < 1e-4


def test_checkpoint_and_resume_reproduce_the_run(runs, tmp_path):
    full = run_lowbit(["+recipe=fp32", *COMMON, "trainer.checkpoint_every=5"], run_dir=tmp_path / "full")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(full.run_dir / "checkpoints", ckpt)
    (ckpt / "latest").write_text("step_0000010")
    resumed = run_lowbit(["+recipe=fp32", *COMMON, f"trainer.resume={ckpt}"], run_dir=tmp_path / "resumed")
    steps = [r["step"] for r in resumed.metrics]
    assert steps == list(range(11, STEPS + 1))
    assert {s: full.losses()[s] for s in steps} == resumed.losses()
    assert full.losses() == runs["fp32"].losses()  # checkpointing does not touch numerics
    out = subprocess.run([sys.executable, "-m", "train.export", str(full.run_dir), "--eval"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("val/loss ")[1].strip() == f"{full.metrics[-1]['val/loss']:.10f}"  # 1 rank: exact
    # the checkpoint records its layout; another world size or ZeRO stage is refused before start-up
    manifest = json.loads((ckpt / "step_0000010" / "manifest.json").read_text())
    assert (manifest["world_size"], manifest["zero_stage"]) == (1, 0)
    for other in (["launcher.nproc_per_node=2", "parallel=ddp"], ["parallel=zero1"]):
        bad = run_lowbit(["+recipe=fp32", *COMMON, f"trainer.resume={ckpt}", *other], run_dir=tmp_path / "x",
                         check=False, timeout=60)  # fmt: skip
        assert bad.proc.returncode == 2, bad.proc.stderr[-2000:]
        line = bad.proc.stderr.strip().splitlines()
        assert len(line) == 1 and line[0].startswith(f"lowbit: config error: trainer.resume={ckpt}: "), line
        assert "written by 1 rank(s) at ZeRO stage 0" in line[0]


def test_local_multirun_two_recipes(tmp_path):
    res = run_lowbit(
        [
            "-m",
            "+recipe=fp32,bf16",
            "trainer.max_steps=3",
            "trainer.log_every=1",
            "trainer.eval_sequences=16",
            f"hydra.sweep.dir={tmp_path}",
        ],
    )
    assert res.proc.returncode == 0
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and (p / "metrics.jsonl").exists())
    assert len(jobs) == 2, list(tmp_path.iterdir())
    precisions = []
    for job in jobs:
        m = read_jsonl(job / "metrics.jsonl")
        assert [r["step"] for r in m] == [1, 2, 3]
        precisions.append(
            json.loads(json.dumps(__import__("yaml").safe_load((job / "run_config.yaml").read_text())))[
                "config"
            ]["recipe"]["precision"]
        )
        wb = read_run(find_run_files(job)[0])
        assert wb["exit_code"] == 0 and len(wb["history"]) == 3
    assert sorted(precisions) == ["bf16", "fp32"]


def test_activation_checkpointing_does_not_touch_numerics(runs, tmp_path):
    res = run_lowbit(
        ["parallel=single", "+recipe=fp32", *COMMON, "trainer.activation_checkpointing=true", "logger=none"],
        run_dir=tmp_path,
    )
    assert res.losses() == runs["fp32"].losses()


def test_deepspeed_launcher_local_rank_argument_is_dropped():
    from train.cli import strip_launcher_args

    assert strip_launcher_args(["run.py", "--local_rank=1", "model=tiny"]) == ["run.py", "model=tiny"]
    assert strip_launcher_args(["run.py", "--local_rank", "0", "x=1"]) == ["run.py", "x=1"]


@pytest.mark.dist
def test_runs_under_the_deepspeed_launcher(runs, tmp_path):
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    res = run_lowbit(
        ["parallel=ddp", "+recipe=fp32", *COMMON, "logger=none"],
        run_dir=tmp_path,
        launcher=[
            deepspeed,
            "--num_gpus",
            "2",
            "--master_port",
            str(__import__("train.distenv").distenv.free_port()),
        ],
    )
    assert res.run_config["resolved"]["world_size"] == 2
    ref = runs["fp32"].losses()
    assert max(abs(res.losses()[s] - ref[s]) for s in ref) < 1e-4
