"""Hydra callback: write ``sweep.json`` in the sweep directory when a multirun ends.

It lists every job of the sweep: its overrides, Slurm job id (if any), run
directory, state and final metrics, read from what each job left in its run
directory (``.hydra/overrides.yaml``, ``job.jsonl``, ``summary.json``,
``metrics.jsonl``). Works for the basic launcher and for submitit/Slurm, where
jobs ran on other machines and only their files come back.

States: ``completed`` (summary.json written), ``incomplete`` (started, no
summary: failed, preempted or still requeued), ``missing`` (never started).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig


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
