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
from recipes.errors import ConfigError
from train import faults

CHECKPOINT_DIR = "checkpoints"
REFERENCE_CHECKPOINT_DIR = "checkpoints_reference"
#: suffix of a checkpoint directory DeepSpeed is still writing (renamed when complete)
PARTIAL = ".partial"
#: each checkpoint's list of files and sizes, written last (before the rename)
MANIFEST = "manifest.json"


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


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (non-finite values decoded; a torn last line left out)."""
    from train.telemetry.loggers import decode_row

    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(decode_row(json.loads(line)))
        except ValueError:
            continue  # a line a kill cut short
    return rows


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


def write_outcome(run_dir: Path, summary: dict[str, Any]) -> None:
    """What ``train.sweep_index.run_state`` reads: ``summary.json`` for a completed run,
    ``preempted.json`` for one that checkpointed on a preemption signal."""
    if summary["state"] == "completed":
        write_summary(run_dir, summary)
    elif summary["state"] == "preempted":
        (run_dir / "preempted.json").write_text(json.dumps({"step": summary.get("final/step")}) + "\n")


def checkpoint_due(*, every: int, step: int, last_step: int) -> bool:
    """``trainer.checkpoint_every`` steps, and the last step when periodic checkpoints are on."""
    return bool(every) and (step % every == 0 or step == last_step)


def _tags(ckpt: Path) -> list[str]:
    """Complete checkpoints (``step_N`` directories; ``.partial`` ones are unfinished), newest first."""
    if not ckpt.is_dir():
        return []
    return sorted((d.name for d in ckpt.iterdir() if d.is_dir() and d.name.startswith("step_")
                   and not d.name.endswith(PARTIAL)), reverse=True)  # fmt: skip


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _save_one(
    engine: Any, ckpt: Path, tag: str, client_state: dict[str, Any] | None, keep: int, step: int
) -> None:
    """DeepSpeed writes ``<tag>.partial/`` (every rank its shards); then rank 0 records the files in
    ``manifest.json``, renames the directory to ``<tag>`` and points ``latest`` at it, last; older
    checkpoints beyond ``keep`` (0: keep all) and stale partial ones are removed."""
    import shutil

    partial = ckpt / (tag + PARTIAL)
    engine.save_checkpoint(str(ckpt), tag=partial.name, client_state=client_state or {}, save_latest=False)
    faults.hit("checkpoint", step)  # debug.kill_in=checkpoint: a real SIGKILL mid-write
    _barrier()
    if _is_main():
        files = {
            str(f.relative_to(partial)): f.stat().st_size for f in sorted(partial.rglob("*")) if f.is_file()
        }
        import torch.distributed as dist

        layout = {
            "world_size": dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1,
            "zero_stage": int(engine.zero_optimization_stage()),
        }
        (partial / MANIFEST).write_text(json.dumps({"tag": tag, **layout, "files": files}, indent=1) + "\n")
        final = ckpt / tag
        if final.exists():  # an earlier attempt at this step
            shutil.rmtree(final)
        os.replace(partial, final)
        _write_atomic(ckpt / "latest", tag)
        for old in _tags(ckpt)[keep:] if keep else []:
            shutil.rmtree(ckpt / old)
        for stale in ckpt.glob("*" + PARTIAL):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()


def save_checkpoint(engine: Any, recipe: Recipe, run_dir: Path, step: int, *, reference_engine: Any | None = None,
                    keep: int = 0) -> None:  # fmt: skip
    """An atomic checkpoint of the engine (and the lockstep reference's, first, so that ``latest``
    of the run implies the reference's); ``trainer.keep_checkpoints`` = ``keep``."""
    tag = f"step_{step:07d}"
    if reference_engine is not None:
        _save_one(reference_engine, run_dir / REFERENCE_CHECKPOINT_DIR, tag, None, keep, step)
    _save_one(
        engine, run_dir / CHECKPOINT_DIR, tag, {"step": step, "recipe": recipe.state_dict()}, keep, step
    )


def resume_layout_problem(
    run_dir: Path, resume: str, *, world_size: int, zero_stage: int
) -> ConfigError | None:
    """A checkpoint ``trainer.resume`` would load that another world size or ZeRO stage wrote:
    refused before start-up (DeepSpeed's ZeRO shards and BF16 optimizer partitions are laid out
    per rank; lowbit does not re-partition them). Checkpoints without a layout record pass."""
    if resume == "none":
        return None
    ckpt = run_dir / CHECKPOINT_DIR if resume == "auto" else Path(resume)
    latest = ckpt / "latest"
    manifest = ckpt / latest.read_text().strip() / MANIFEST if latest.exists() else None
    if manifest is None or not manifest.exists():
        return None
    m = json.loads(manifest.read_text())
    theirs, ours = (m.get("world_size"), m.get("zero_stage")), (world_size, zero_stage)
    if None in theirs or theirs == ours:
        return None
    return ConfigError(
        "trainer.resume", resume,
        f"{ckpt} was written by {theirs[0]} rank(s) at ZeRO stage {theirs[1]}, this run has {ours[0]} at "
        f"stage {ours[1]}: resume with the same launcher.nproc_per_node / parallel, or start in a new run "
        "dir (hydra.run.dir=...) or with trainer.resume=none",
    )  # fmt: skip


def checkpoint_problem(ckpt: Path, tag: str) -> str | None:
    """Why ``ckpt/tag`` is not a complete checkpoint (a file of its manifest missing or of another
    size), or None. Checkpoints from before manifests were written pass."""
    d = ckpt / tag
    if not d.is_dir():
        return f"{d} does not exist"
    manifest = d / MANIFEST
    if not manifest.exists():
        return None
    for name, size in json.loads(manifest.read_text())["files"].items():
        f = d / name
        if not f.exists():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} has {f.stat().st_size} bytes, the manifest says {size}"
    return None


def resume(
    engine: Any, recipe: Recipe, run_dir: Path, *, resume: str, reference_engine: Any | None = None
) -> tuple[int, str | None]:
    """Load the newest usable checkpoint in the directory ``trainer.resume`` names (none | auto |
    a directory): ``latest`` first, then older ones, newest first, when one is incomplete
    (manifest) or fails to load on any rank, with a warning naming it. Returns the step to continue
    after (0: from scratch) and a note for the log."""
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
    latest = (ckpt / "latest").read_text().strip()
    candidates = [latest] + [t for t in _tags(ckpt) if t != latest and t < latest]
    warnings: list[str] = []
    for tag in candidates:
        why = checkpoint_problem(ckpt, tag)
        client: dict[str, Any] | None = None
        if why is None:
            try:
                _, client = engine.load_checkpoint(str(ckpt), tag=tag)
                if reference_engine is not None:
                    reference_engine.load_checkpoint(str(run_dir / REFERENCE_CHECKPOINT_DIR), tag=tag)
            except Exception as e:  # a corrupt file: any error of torch.load or DeepSpeed
                why = f"{ckpt / tag} failed to load ({type(e).__name__}: {str(e)[:200]})"
        if _any_rank(why is not None or client is None):
            warnings.append(
                f"lowbit: warning: checkpoint {ckpt / tag} is unusable: {why or 'another rank failed to load it'}"
            )
            continue
        assert client is not None
        recipe.load_state_dict(client.get("recipe", {}))  # e.g. delayed-scaling amax histories
        step = int(client["step"])
        return step, "\n".join([*warnings, f"resumed from {ckpt} at step {step}"])
    raise RuntimeError("no usable checkpoint in " + str(ckpt) + ":\n" + "\n".join(warnings))


def _any_rank(flag: bool) -> bool:
    """True when ``flag`` holds on any rank (every rank calls it)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
