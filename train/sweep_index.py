"""Hydra callback: write ``sweep.json`` in the sweep directory when a multirun ends.

It lists every job of the sweep: its overrides, Slurm job id (if any), run
directory, state and final metrics, read from what each job left in its run
directory (``.hydra/overrides.yaml``, ``job.jsonl``, ``summary.json``,
``metrics.jsonl``). Works for the basic launcher and for submitit/Slurm, where
jobs ran on other machines and only their files come back.

States (``STATES``, the vocabulary ``sweep.json`` and ``python -m train.report`` share; ``run_state``
decides, from the files alone):

* ``completed``: ``summary.json`` written (the trainer writes it only on success);
* ``config_error`` / ``failed`` / ``nonfinite``: the member wrote ``member_error.json`` (a config
  error; an exception in training; ``trainer.on_nonfinite=stop`` stopped it), or a single run
  left ``nonfinite_report.json``; ``reason`` says what;
* ``preempted``: the trainer checkpointed on a preemption signal and exited for requeue
  (``preempted.json``), and no restart began after it;
* ``running``: started (``job.jsonl``), none of the above: in progress, requeued, or killed
  without a word (a SIGKILL leaves nothing to tell these apart);
* ``missing``: never started.

A sweep with any member not ``completed`` exits with status 1, after every member ran and
``sweep.json`` was written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

#: written by a sweep member that failed (``train/run.py``): {"state": ..., "reason": ...}
MEMBER_ERROR = "member_error.json"
#: written by the trainer when it stops on a preemption signal: {"step": N}
PREEMPTED = "preempted.json"
STATES = ("completed", "running", "preempted", "failed", "config_error", "nonfinite", "missing")


def run_state(run_dir: Path) -> tuple[str, str]:
    """(state, reason) of one run directory, from the files it left (see the module docstring)."""
    if (run_dir / "summary.json").exists():
        return "completed", ""
    error = run_dir / MEMBER_ERROR
    if error.exists():
        rec = json.loads(error.read_text())
        return rec["state"], rec.get("reason", "")
    if (run_dir / "nonfinite_report.json").exists():
        return "nonfinite", f"report: {run_dir / 'nonfinite_report.json'}"
    starts, preempted = run_dir / "job.jsonl", run_dir / PREEMPTED
    if preempted.exists() and (not starts.exists() or preempted.stat().st_mtime >= starts.stat().st_mtime):
        step = json.loads(preempted.read_text()).get("step")
        return "preempted", f"checkpointed at step {step}, waiting for requeue"
    if starts.exists() or (run_dir / "metrics.jsonl").exists():
        return "running", ""
    return "missing", ""


def record_member_failure(run_dir: Path, state: str, reason: str) -> None:
    """A sweep member's failure, for ``sweep.json`` (``state``: config_error | failed)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MEMBER_ERROR).write_text(json.dumps({"state": state, "reason": reason}) + "\n")


def job_record(job_dir: Path) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "num": int(job_dir.name) if job_dir.name.isdigit() else job_dir.name,
        "run_dir": str(job_dir),
        "overrides": yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or [],
        "slurm_job_id": None,
        "state": "missing",
    }
    starts = job_dir / "job.jsonl"
    if starts.exists():
        lines = [json.loads(x) for x in starts.read_text().splitlines() if x.strip()]
        last = lines[-1]
        rec["slurm_job_id"] = (
            f"{last['slurm_array_job_id']}_{last['slurm_array_task_id']}"
            if last.get("slurm_array_job_id")
            else last.get("slurm_job_id")
        )
        rec["restarts"] = len(lines) - 1
    rec["state"], reason = run_state(job_dir)
    if reason:
        rec["reason"] = reason
    summary = job_dir / "summary.json"
    if summary.exists():
        rec["summary"] = json.loads(summary.read_text())
    metrics = job_dir / "metrics.jsonl"
    if metrics.exists():
        rows = [line for line in metrics.read_text().splitlines() if line.strip()]
        rec["last_logged_step"] = json.loads(rows[-1])["step"] if rows else None
    return rec


def build_index(sweep_dir: Path) -> dict[str, Any]:
    jobs = [
        job_record(d)
        for d in sorted(sweep_dir.iterdir(), key=lambda p: (len(p.name), p.name))
        if d.is_dir() and (d / ".hydra" / "overrides.yaml").exists()
    ]
    states = [j["state"] for j in jobs]
    return {
        "sweep_dir": str(sweep_dir),
        "num_jobs": len(jobs),
        "num_completed": states.count("completed"),
        "jobs": jobs,
    }


class SweepIndex(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        index = build_index(sweep_dir)
        (sweep_dir / "sweep.json").write_text(json.dumps(index, indent=1) + "\n")
        print(
            f"lowbit: sweep index {sweep_dir / 'sweep.json'}: {index['num_completed']}/{index['num_jobs']} completed"
        )
        bad = [j for j in index["jobs"] if j["state"] != "completed"]
        if bad:
            from train.launch import exit_cleanly_at_exit, set_exit_status

            for j in bad:
                print(f"lowbit: sweep member {j['num']} {j['state']}: {j.get('reason', j['run_dir'])}")
            set_exit_status(1)
            exit_cleanly_at_exit()
