"""What the ablation tools (``train.attribute``, ``train.sensitivity``) share: paired member runs.

A *member* is one configuration trained on the tool's seeds: one Hydra multirun of
``train/run.py`` over ``trainer.seed=1,2,...`` into ``<sweep_dir>/seed<N>`` (the basic launcher or
Slurm, ``hydra/launcher=slurm``, alike). A seed whose ``summary.json`` says ``completed`` is read
back, never trained again, so a tool's same command resumes in its ``--out`` directory. The gap of
a member's seed is ``train.review.verdict.seed_delta`` against the same seed's BF16 run (same
initial weights and data order): the report's rule, one definition.

:class:`Progress` prints each member as it starts and, from the wall time of the runs trained so
far (the first one is the measured estimate), the time left for the runs still to train.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from recipes.errors import ConfigError
from train.cli import config_error_exit, split_override
from train.review.series import read_series
from train.review.verdict import seed_delta
from train.sweep_index import run_state

ROOT = Path(__file__).resolve().parents[1]
#: a torchrun-style topology in the tool's environment is not its members': each member is a fresh
#: top-level run (train.distenv would otherwise join it, e.g. a MASTER_PORT an in-process engine
#: of the caller still holds: EADDRINUSE)
TOPOLOGY_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")  # fmt: skip


def member_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a member's ``train/run.py``: the tool's, minus :data:`TOPOLOGY_VARS`."""
    env = dict(os.environ if environ is None else environ)
    return {k: v for k, v in env.items() if k not in TOPOLOGY_VARS}


def completed(run_dir: Path) -> bool:
    return run_state(run_dir)[0] == "completed"


def refuse(key: str, value: object, fix: str) -> None:
    """The one-line ``lowbit: config error`` and exit 2."""
    config_error_exit(ConfigError(key, value, fix))


def check_tool_args(tool: str, user: list[str], *, owned: tuple[str, ...], owned_by: str, seeds: int,
                    positive: dict[str, float]) -> None:  # fmt: skip
    """What every ablation tool refuses: an override it sets itself (``owned``, set by the flags
    named in ``owned_by``), fewer than 2 seeds (no noise estimate), and any of ``positive`` (flag ->
    value, in the order checked) that is not > 0."""
    for o in user:
        kv = split_override(o)
        if kv and kv[0] in owned:
            refuse(kv[0], kv[1], f"{tool} sets it itself ({owned_by}); drop it")
    if seeds < 2:
        refuse("--seeds", seeds, "at least 2: one seed gives no noise estimate")
    for flag, value in positive.items():
        if not value > 0:
            refuse(flag, value, "must be > 0")


def without_recipe(user: list[str]) -> list[str]:
    """The user's overrides minus those of the recipe (``+recipe=...``, ``recipe.*``)."""
    return [o for o in user if not (split_override(o) or ("",))[0].startswith("recipe")]


def seed_gap(run: Path, ref: Path, *, last_k: int) -> float | None:
    """The delta of one seed (module docstring); None when either run has not completed."""
    if not (completed(run) and completed(ref)):
        return None
    a, b = read_series(run / "metrics.jsonl"), read_series(ref / "metrics.jsonl")
    return seed_delta(*a.get("train/loss"), *b.get("train/loss"), k=last_k)


class Progress:
    """Counts the runs a tool trains and estimates the time left from those already trained."""

    def __init__(self, tool: str, total: int) -> None:
        self.tool, self.total, self.done, self.seconds = tool, total, 0, 0.0

    def eta(self) -> str:
        if not self.done:
            return "time left: measured after the first run"
        per = self.seconds / self.done
        return f"{per:.0f} s per run measured; ~{per * (self.total - self.done) / 60:.1f} min left"

    def run_member(self, label: str, overrides: list[str], seeds: list[int], sweep_dir: Path) -> bool:
        """Train the seeds of one member that have not completed; True when all of them did."""
        todo = [s for s in seeds if not completed(sweep_dir / f"seed{s}")]
        if not todo:
            return True
        print(f"{self.tool}: [{self.done + 1}-{self.done + len(todo)}/{self.total} runs] {label}: seeds "
              f"{','.join(map(str, todo))} ({self.eta()})", flush=True)  # fmt: skip
        cmd = [sys.executable, "train/run.py", "-m", *overrides, f"trainer.seed={','.join(map(str, todo))}",
               f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=seed${trainer.seed}"]  # fmt: skip
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT, env=member_env()).returncode
        self.seconds += time.perf_counter() - t0
        self.done += len(todo)
        return rc == 0 and all(completed(sweep_dir / f"seed{s}") for s in todo)
