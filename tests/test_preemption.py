"""Preemption without Slurm: a signal makes the trainer checkpoint at the next step
boundary and exit 0; rerunning in the same run directory resumes and ends exactly
where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import ROOT, RUN_PY, read_jsonl, run_lowbit

ARGS = [
    "+recipe=fp32",
    "trainer.max_steps=40",
    "trainer.log_every=1",
    "trainer.eval_every=20",
    "trainer.eval_sequences=16",
    "logger=none",
]


def wait_for_step(path, step: int, *, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(read_jsonl(path)) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no step {step} in {path} after {timeout} s")


def assert_preempted(proc: subprocess.Popen, run_dir, *, signalled_after: int, max_steps: int) -> int:
    """The signalled trainer exited 0 after a checkpoint at the step it stopped at; returns that step."""
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "preemption signal" in out
    stopped_at = read_jsonl(run_dir / "metrics.jsonl")[-1]["step"]
    assert signalled_after <= stopped_at < max_steps
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:07d}"
    return stopped_at


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted run of ARGS, the reference of every signal below."""
    return run_lowbit(ARGS, run_dir=tmp_path_factory.mktemp("preempt") / "ref")


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_checkpoints_then_resume_matches_uninterrupted(sig, tmp_path, uninterrupted):
    ref = uninterrupted
    run_dir = tmp_path / "interrupted"
    env = {**os.environ}
    env.pop("RANK", None)
    proc = subprocess.Popen(
        [sys.executable, str(RUN_PY), *ARGS, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(run_dir / "metrics.jsonl", 8, proc=proc)
    proc.send_signal(sig)
    stopped_at = assert_preempted(proc, run_dir, signalled_after=8, max_steps=40)
    assert not (run_dir / "summary.json").exists()
    from train.sweep_index import run_state

    state, reason = run_state(run_dir)  # what sweep.json and the report say about it
    assert state == "preempted" and f"step {stopped_at}" in reason, (state, reason)

    resumed = run_lowbit(ARGS, run_dir=run_dir)  # trainer.resume=auto is the default
    assert f"resumed from {run_dir / 'checkpoints'} at step {stopped_at}" in resumed.proc.stdout
    assert [m["step"] for m in resumed.metrics] == list(range(1, 41))
    assert resumed.losses() == ref.losses()
    assert resumed.metrics[-1]["val/loss"] == ref.metrics[-1]["val/loss"]
    assert len(read_jsonl(run_dir / "job.jsonl")) == 2
    assert run_state(run_dir) == ("completed", "")


def _worker_pids(root: int) -> dict[int, int]:
    """rank -> pid of the workers a ``launcher.nproc_per_node`` run started below ``root`` (from /proc)."""
    parent, env = {}, {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{entry}/stat").read()
            env[int(entry)] = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])

    def below_root(pid: int) -> bool:
        while pid > 1:
            pid = parent.get(pid, 0)
            if pid == root:
                return True
        return False

    out = {}
    for pid, variables in env.items():
        ranks = [int(v.split(b"=", 1)[1]) for v in variables if v.startswith(b"RANK=")]
        if ranks and below_root(pid):
            out[ranks[0]] = pid
    return out


@pytest.mark.dist
def test_signal_to_one_rank_stops_all_ranks_at_the_same_step(tmp_path):
    """The stop decision is a non-blocking all-reduce read one step later: a signal that reaches
    only rank 1 still stops both ranks at one step boundary, with one checkpoint, and the resumed
    run equals an uninterrupted 2-rank run exactly."""
    args = [a for a in ARGS if not a.startswith("trainer.max_steps")] + [
        "trainer.max_steps=30",
        "parallel=ddp",
    ]
    # torchrun execs its workers with RANK in their environment, so /proc tells which pid is rank 1
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    ref = run_lowbit(args, run_dir=tmp_path / "ref", launcher=torchrun)
    run_dir = tmp_path / "interrupted"
    proc = subprocess.Popen([*torchrun, str(RUN_PY), *args, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                            env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for_step(run_dir / "metrics.jsonl", 6, proc=proc)
    workers = _worker_pids(proc.pid)
    assert sorted(workers) == [0, 1], workers
    os.kill(workers[1], signal.SIGUSR1)
    assert_preempted(proc, run_dir, signalled_after=6, max_steps=30)
    resumed = run_lowbit(args, run_dir=run_dir, launcher=torchrun)
    assert [m["step"] for m in resumed.metrics] == list(range(1, 31))
    assert resumed.losses() == ref.losses()
