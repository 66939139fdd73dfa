"""The run directory's files: ``run_config.yaml``, ``job.jsonl``, ``metrics.jsonl`` on restart,
and the DeepSpeed checkpoints (with the recipe's state and the lockstep reference's engine).

Everything takes the parts it writes explicitly (engine, recipe, run dir), never the whole run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from recipes.base import Recipe

CHECKPOINT_DIR = "checkpoints"
REFERENCE_CHECKPOINT_DIR = "checkpoints_reference"


def write_run_config(run_dir: Path, resolved: dict[str, Any]) -> None:
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "run_config.yaml", "w") as f:
        yaml.safe_dump(resolved, f, sort_keys=False)


def write_job_info(run_dir: Path, *, start_step: int) -> None:
    """Who ran this (Slurm job, host) and from which step: appended per (re)start."""
    info = {
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_array_job_id": os.environ.get("SLURM_ARRAY_JOB_ID"),
        "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        "host": os.uname().nodename,
        "start_step": start_step,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    with open(run_dir / "job.jsonl", "a") as f:
        f.write(json.dumps(info) + "\n")


def truncate_metrics(path: Path, *, after_step: int) -> None:
    """Drop rows logged after the step we (re)start from: a hard kill can leave some,
    and a rerun from scratch in the same directory starts a fresh file."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line)["step"] <= after_step]
    if len(kept) != len(rows):
        path.write_text("".join(line + "\n" for line in kept))


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    with open(run_dir / "summary.json", "w") as f:
        json.dump(summary, f, indent=1)


def checkpoint_due(*, every: int, step: int, last_step: int) -> bool:
    """``trainer.checkpoint_every`` steps, and the last step when periodic checkpoints are on."""
    return bool(every) and (step % every == 0 or step == last_step)


def save_checkpoint(
    engine: Any, recipe: Recipe, run_dir: Path, step: int, *, reference_engine: Any | None = None
) -> None:
    tag = f"step_{step:07d}"
    if reference_engine is not None:  # first, so `latest` of the run implies the reference's
        reference_engine.save_checkpoint(str(run_dir / REFERENCE_CHECKPOINT_DIR), tag=tag)
    engine.save_checkpoint(
        str(run_dir / CHECKPOINT_DIR), tag=tag, client_state={"step": step, "recipe": recipe.state_dict()}
    )


def resume(
    engine: Any, recipe: Recipe, run_dir: Path, *, resume: str, reference_engine: Any | None = None
) -> tuple[int, str | None]:
    """Load the checkpoint ``trainer.resume`` names (none | auto | a directory); returns the step
    to continue after (0: from scratch) and a note for the log."""
    if resume == "none":
        return 0, None
    ckpt = run_dir / CHECKPOINT_DIR if resume == "auto" else Path(resume)
    if not (ckpt / "latest").exists():
        note = (
            None
            if resume == "auto"
            else f"trainer.resume={resume}: no checkpoint in {ckpt}, starting from step 0"
        )
        return 0, note
    _, client = engine.load_checkpoint(str(ckpt))
    recipe.load_state_dict(client.get("recipe", {}))  # e.g. delayed-scaling amax histories
    if reference_engine is not None:
        reference_engine.load_checkpoint(str(run_dir / REFERENCE_CHECKPOINT_DIR))
    step = int(client["step"])
    return step, f"resumed from {ckpt} at step {step}"
