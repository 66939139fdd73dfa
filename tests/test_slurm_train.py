"""lowbit on a real (local, single-node) Slurm cluster: sbatch with 2 ranks, a 2x2 Hydra
sweep through submitit, and a signalled job that checkpoints, requeues and resumes.

Marked `slurm`; skipped with the reason when no cluster answers (CI starts one with
`bash scripts/slurm_local.sh start`). Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT, read_jsonl
from .test_slurm_cluster import _cluster_skip_reason, skip_or_fail

pytestmark = pytest.mark.slurm
COMMON = [
    "+recipe=fp32",
    "trainer.log_every=1",
    "trainer.eval_every=10",
    "trainer.eval_sequences=16",
    "logger.wandb.mode=offline",
]


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory) -> dict[str, str]:
    reason = _cluster_skip_reason()
    if reason:
        skip_or_fail(reason)
    out = tmp_path_factory.mktemp("slurm_outputs")
    env = {**os.environ, "LOWBIT_OUTPUTS": str(out), "WANDB_MODE": "offline"}
    env["PATH"] = (
        f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # sbatch exports it: the venv's python
    )
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def sbatch(args: list[str], *, env: dict[str, str], log: Path, ntasks: int = 2, per_node: bool = True) -> str:
    cmd = [
        "sbatch",
        "--parsable",
        f"--ntasks-per-node={ntasks}" if per_node else f"--ntasks={ntasks}",
        f"--output={log}",
        "slurm/train.sbatch",
        *args,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_state(job_id: str) -> str:
    proc = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
    )
    for field in proc.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return "UNKNOWN"


def wait_job(job_id: str, *, log: Path, timeout: float = 420) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state in (
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
            "BOOT_FAIL",
        ):
            return state
        time.sleep(1)
    subprocess.run(["scancel", job_id], timeout=30)
    log_tail = log.read_text()[-4000:] if log.exists() else "(no log)"
    raise AssertionError(
        f"job {job_id} not finished after {timeout} s (state {job_state(job_id)}):\n{log_tail}"
    )


def run_dir_of(env: dict[str, str], job_id: str) -> Path:
    return Path(env["LOWBIT_OUTPUTS"]) / "runs" / f"slurm-{job_id}.0"  # the template's srun: step 0


def test_sbatch_two_rank_deepspeed_job(slurm_env, tmp_path):
    log = tmp_path / "job.out"
    # `--ntasks=2` (not only --ntasks-per-node): the template names no task count that would clash
    job = sbatch(["parallel=zero2", "trainer.max_steps=20", *COMMON], env=slurm_env, log=log, per_node=False)
    assert wait_job(job, log=log) == "COMPLETED", log.read_text()[-4000:]
    run_dir = run_dir_of(slurm_env, job)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 21))
    assert metrics[-1]["train/loss"] < metrics[0]["train/loss"] - 0.5
    import yaml

    rc = yaml.safe_load((run_dir / "run_config.yaml").read_text())
    assert rc["resolved"]["world_size"] == 2 and rc["resolved"]["launcher"] == "slurm"
    assert json.loads((run_dir / "job.jsonl").read_text().splitlines()[0])["slurm_job_id"] == job


def test_signalled_job_checkpoints_requeues_and_matches_uninterrupted(slurm_env, tmp_path):
    """One node, two tasks: USR1 at step >= 10, checkpoint, requeue, resume, bit-identical losses
    and one W&B run id. Where the two namespace nodes exist, test_slurm_multinode runs the same
    checks on a 2-node job (a superset: requeue, resume, W&B id, val loss), so this one skips."""
    from .test_slurm_multinode import multinode_partition

    if multinode_partition():
        pytest.skip("covered by test_slurm_multinode's signalled 2-node requeue (the namespace nodes exist)")
    args = ["parallel=ddp", "trainer.max_steps=60", *COMMON]
    ref_log, victim_log = tmp_path / "ref.out", tmp_path / "victim.out"
    ref = sbatch(args, env=slurm_env, log=ref_log)
    victim = sbatch(args, env=slurm_env, log=victim_log)
    victim_metrics = run_dir_of(slurm_env, victim) / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (victim_metrics.exists() and len(read_jsonl(victim_metrics)) >= 10):
        assert time.monotonic() < deadline, (
            victim_log.read_text()[-4000:] if victim_log.exists() else "no log"
        )
        assert job_state(victim) in ("PENDING", "RUNNING", "CONFIGURING"), victim_log.read_text()[-4000:]
        time.sleep(0.5)
    subprocess.run(["scancel", "--batch", "--signal=USR1", victim], check=True, timeout=30)
    assert wait_job(ref, log=ref_log) == "COMPLETED"
    assert wait_job(victim, log=victim_log) == "COMPLETED", victim_log.read_text()[-4000:]

    run_dir = run_dir_of(slurm_env, victim)
    starts = read_jsonl(run_dir / "job.jsonl")
    assert len(starts) == 2 and starts[1]["slurm_restart_count"] == 1 and 10 <= starts[1]["start_step"] < 60
    got = read_jsonl(run_dir / "metrics.jsonl")
    want = read_jsonl(run_dir_of(slurm_env, ref) / "metrics.jsonl")
    assert [m["step"] for m in got] == list(range(1, 61))
    assert [m["train/loss"] for m in got] == [m["train/loss"] for m in want]
    assert got[-1]["val/loss"] == want[-1]["val/loss"]
    wb = sorted(run_dir.glob("wandb/*run-*/run-*.wandb"))
    assert len({p.parent.name.rsplit("-", 1)[-1] for p in wb}) == 1  # one W&B run id across the requeue


def test_hydra_submitit_sweep_2x2_writes_sweep_index(slurm_env, tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        str(ROOT / "train" / "run.py"),
        "-m",
        "hydra/launcher=slurm",
        "+recipe=fp32,bf16",
        "trainer.seed=1,2",
        "trainer.max_steps=8",
        "trainer.log_every=4",
        "trainer.eval_sequences=16",
        "logger.wandb.mode=offline",
        "hydra.launcher.timeout_min=10",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=slurm_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    index = json.loads((sweep / "sweep.json").read_text())
    assert index["num_jobs"] == 4 and index["num_completed"] == 4, index
    combos = set()
    for job in index["jobs"]:
        assert job["slurm_job_id"] and job["state"] == "completed" and job["last_logged_step"] == 8
        assert Path(job["run_dir"], "metrics.jsonl").exists()
        combos.add(tuple(sorted(o for o in job["overrides"] if o.startswith(("+recipe", "trainer.seed")))))
    assert len(combos) == 4
    groups = set()
    for job in index["jobs"]:
        from tests.wandb_offline import find_run_files, read_run

        groups.add(read_run(find_run_files(job["run_dir"])[0])["run"]["group"])
    assert groups == {sweep.name}

    # a member that did not finish is resubmitted into its own directory and completes again
    victim = index["jobs"][1]
    Path(victim["run_dir"], "summary.json").unlink()
    assert json.loads((sweep / "sweep.json").read_text())["num_completed"] == 4  # stale until rebuilt
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "resubmit_failed.py"), str(sweep)],
        cwd=ROOT,
        env=slurm_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and "1 job(s) to resubmit" in proc.stdout, (
        proc.stdout[-3000:] + proc.stderr[-3000:]
    )
    after = json.loads((sweep / "sweep.json").read_text())
    assert after["num_completed"] == 4
    again = next(j for j in after["jobs"] if j["num"] == victim["num"])
    assert again["overrides"] == victim["overrides"] and again["restarts"] == 1
    assert again["slurm_job_id"] != victim["slurm_job_id"]
    rows = read_jsonl(Path(again["run_dir"]) / "metrics.jsonl")
    assert [r["step"] for r in rows] == [4, 8]  # restarted from scratch (no checkpoint), no duplicate rows


def test_multitask_sweep_job_trains_with_two_ranks(slurm_env, tmp_path):
    """hydra.launcher.tasks_per_node=2: each submitit task is one rank of one DeepSpeed job."""
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        str(ROOT / "train" / "run.py"),
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.tasks_per_node=2",
        "parallel=ddp",
        "+recipe=fp32",
        "trainer.max_steps=6",
        "trainer.log_every=3",
        "trainer.eval_sequences=16",
        "logger.wandb.mode=offline",
        "hydra.launcher.timeout_min=10",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=slurm_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    index = json.loads((sweep / "sweep.json").read_text())
    assert index["num_jobs"] == 1 and index["num_completed"] == 1, index
    import yaml

    rc = yaml.safe_load(Path(index["jobs"][0]["run_dir"], "run_config.yaml").read_text())
    assert rc["resolved"]["world_size"] == 2 and rc["resolved"]["launcher"] == "slurm"
    assert [r["step"] for r in read_jsonl(Path(index["jobs"][0]["run_dir"]) / "metrics.jsonl")] == [3, 6]


def test_submitit_usr2_checkpoints_requeues_and_resumes(slurm_env, tmp_path):
    """submitit's USR2 (its timeout/preemption signal): the trainer checkpoints, hands the signal to
    submitit's handler, which requeues the job; the requeued job resumes in the same run dir."""
    args = [
        "+recipe=fp32",
        "trainer.max_steps=60",
        "trainer.log_every=1",
        "trainer.eval_every=30",
        "trainer.eval_sequences=16",
        "logger.wandb.mode=offline",
    ]
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        str(ROOT / "train" / "run.py"),
        "-m",
        "hydra/launcher=slurm",
        *args,
        "hydra.launcher.timeout_min=10",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=slurm_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = sweep / "0" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(read_jsonl(metrics)) >= 10):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError(f"sweep job never reached step 10: {proc.communicate()[1][-3000:]}")
        time.sleep(0.5)
    job_id = sorted(p.name for p in (sweep / ".submitit").iterdir() if p.name[0].isdigit())[0]
    subprocess.run(["scancel", "--signal=USR2", job_id.split("_")[0]], check=True, timeout=30)
    out, err = proc.communicate(timeout=420)
    assert proc.returncode == 0, out[-2000:] + err[-4000:]
    starts = read_jsonl(sweep / "0" / "job.jsonl")
    assert len(starts) == 2 and 10 <= starts[1]["start_step"] < 60
    rows = read_jsonl(metrics)
    assert [r["step"] for r in rows] == list(range(1, 61))
    ref = run_lowbit_local([*args, "logger=none"], tmp_path / "ref")
    assert [r["train/loss"] for r in rows] == [r["train/loss"] for r in ref]
    assert json.loads((sweep / "sweep.json").read_text())["num_completed"] == 1


def run_lowbit_local(args: list[str], run_dir: Path) -> list[dict]:
    from .conftest import run_lowbit

    return run_lowbit(args, run_dir=run_dir).metrics


def test_two_runs_in_one_allocation_get_their_own_run_dirs(slurm_env, tmp_path):
    """Two `train/run.py` in one srun step (one rank): `slurm-<job>.0` and `slurm-<job>.0-2`, both
    complete, neither truncating or resuming the other (train.cli.slurm_stamp)."""
    log = tmp_path / "job.out"
    args = " ".join(["trainer.max_steps=3", *COMMON])
    script = tmp_path / "two_runs.sbatch"
    script.write_text(
        f"#!/bin/bash\nset -euo pipefail\ncd {ROOT}\n"
        f"srun bash -c 'python train/run.py {args} trainer.seed=1 && python train/run.py {args} trainer.seed=2'\n"
    )
    proc = subprocess.run(["sbatch", "--parsable", "--ntasks=1", f"--output={log}", str(script)],
                          cwd=ROOT, env=slurm_env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    assert wait_job(job, log=log, timeout=300) == "COMPLETED", log.read_text()[-4000:]
    first, second = run_dir_of(slurm_env, job), run_dir_of(slurm_env, job).with_name(f"slurm-{job}.0-2")
    for run_dir, seed in ((first, 1), (second, 2)):
        assert json.loads((run_dir / "summary.json").read_text())["state"] == "completed", run_dir
        assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]
        assert f"seed: {seed}" in (run_dir / "run_config.yaml").read_text()
        assert len(read_jsonl(run_dir / "job.jsonl")) == 1  # neither resumed the other
