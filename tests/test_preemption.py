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


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_checkpoints_then_resume_matches_uninterrupted(sig, tmp_path):
    ref = run_lowbit(ARGS, run_dir=tmp_path / "ref")
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
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "preemption signal" in out
    stopped_at = read_jsonl(run_dir / "metrics.jsonl")[-1]["step"]
    assert 8 <= stopped_at < 40
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:07d}"
    assert not (run_dir / "summary.json").exists()

    resumed = run_lowbit(ARGS, run_dir=run_dir)  # trainer.resume=auto is the default
    assert f"resumed from {run_dir / 'checkpoints'} at step {stopped_at}" in resumed.proc.stdout
    assert [m["step"] for m in resumed.metrics] == list(range(1, 41))
    assert resumed.losses() == ref.losses()
    assert resumed.metrics[-1]["val/loss"] == ref.metrics[-1]["val/loss"]
    assert len(read_jsonl(run_dir / "job.jsonl")) == 2
