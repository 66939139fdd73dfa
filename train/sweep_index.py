"""Hydra callback: write ``sweep.json`` in the sweep directory when a multirun ends.

It lists every job of the sweep: its overrides, Slurm job id (if any), run
directory, state and final metrics, read from what each job left in its run
directory (``.hydra/overrides.yaml``, ``job.jsonl``, ``summary.json``,
``metrics.jsonl``). Works for the basic launcher and for submitit/Slurm, where
jobs ran on other machines and only their files come back.

States: ``completed`` (summary.json written), ``config_error`` / ``failed`` (the member wrote
``member_error.json``: a config error, or an exception in training; ``reason`` says which),
``incomplete`` (started, no summary: killed, preempted or still requeued), ``missing`` (never
started). A sweep with any member not ``completed`` exits with status 1, after every member
ran and ``sweep.json`` was written.
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
        rec["state"] = "incomplete"
    summary = job_dir / "summary.json"
    if summary.exists():
        rec["state"] = "completed"
        rec["summary"] = json.loads(summary.read_text())
    error = job_dir / MEMBER_ERROR
    if error.exists():
        rec.update(json.loads(error.read_text()))
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
