"""Shared test helpers: run the real entry point in a subprocess and read its outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_PY = ROOT / "train" / "run.py"


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory):
    """One lowbit data cache per test session; W&B always offline and quiet."""
    cache = os.environ.get("LOWBIT_CACHE") or str(tmp_path_factory.mktemp("lowbit_cache"))
    os.environ["LOWBIT_CACHE"] = cache
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    os.environ.setdefault("WANDB_CACHE_DIR", str(tmp_path_factory.mktemp("wandb_cache")))
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield


@dataclass
class RunResult:
    proc: subprocess.CompletedProcess
    run_dir: Path

    @property
    def metrics(self) -> list[dict]:
        return read_jsonl(self.run_dir / "metrics.jsonl")

    def losses(self) -> dict[int, float]:
        return {m["step"]: m["train/loss"] for m in self.metrics}

    @property
    def run_config(self) -> dict:
        import yaml

        return yaml.safe_load((self.run_dir / "run_config.yaml").read_text())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_lowbit(
    args: list[str],
    *,
    run_dir: Path | None = None,
    timeout: float = 300,
    check: bool = True,
    launcher: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> RunResult:
    """``python train/run.py ARGS hydra.run.dir=RUN_DIR`` (or under ``launcher``)."""
    cmd = list(launcher or [sys.executable]) + [str(RUN_PY), *args]
    if run_dir is not None:
        cmd.append(f"hydra.run.dir={run_dir}")
    full_env = {**os.environ, **(env or {})}
    full_env.pop("RANK", None)
    full_env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return RunResult(proc, run_dir or ROOT)
