"""The runs a report compares: found on disk (a sweep directory, or run directories) or pulled
from W&B (``train.review.wandb_runs``), each turned into one ``Run`` record.

A ``Run`` carries what the report needs and nothing it would have to decode itself: the recipe's
*name* as the trainer resolved it (the report never parses recipe names: it groups by them), the
seed, the backend and GEMM implementation the run actually used, its state in the sweep
vocabulary (``train.sweep_index.STATES``), its metrics as columns (``train.review.series``),
its ``run_config.yaml`` and ``summary.json``, its provenance, and where to open it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from train.cli import split_override
from train.review.series import Series, read_series
from train.sweep_index import run_state


@dataclass
class Run:
    name: str
    recipe: str
    seed: int
    state: str
    series: Series
    config: dict[str, Any] = field(
        default_factory=dict
    )  # run_config.yaml (config, resolved, fingerprints, env)
    summary: dict[str, Any] = field(default_factory=dict)
    reason: str = ""  # why failed / refused from the comparison
    path: Path | None = None
    url: str | None = None  # the W&B run page when synced (else the report links ``path``)
    excluded: str = ""  # set by the report: why this run is left out of the comparison

    def cfg(self, dotted: str, default: Any = None) -> Any:
        d: Any = self.config
        for part in dotted.split("."):
            if not isinstance(d, dict) or part not in d:
                return default
            d = d[part]
        return d

    @property
    def model(self) -> str:
        return str(self.cfg("config.model.name", "?"))

    @property
    def backend(self) -> str:
        return str(self.cfg("resolved.recipe.resolved_backend", self.cfg("config.recipe.backend", "?")))

    @property
    def gemm_impl(self) -> str:
        return str(self.cfg("resolved.recipe.gemm_impl", ""))

    @property
    def parallel(self) -> str:
        return str(self.cfg("config.parallel.name", "?"))

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step (global batch x sequence length), for loss-vs-tokens plots."""
        return int(self.cfg("config.trainer.global_batch_size", 0)) * int(self.cfg("config.model.seq_len", 0))

    @property
    def provenance(self) -> dict[str, str]:
        pk = self.cfg("env.packages", {}) or {}
        sha = self.cfg("env.git_sha") or ""
        return {
            "git": str(sha)[:10],
            "torch": str(pk.get("torch", "")),
            "deepspeed": str(pk.get("deepspeed", "")),
        }

    @property
    def link(self) -> str:
        return self.url or (str(self.path) if self.path else "")

    @property
    def has_own_reference(self) -> bool:
        """The run trained against a reference itself (``div/`` keys: lockstep or a reference run)."""
        return "div/loss_delta" in self.series


def is_run_dir(path: Path) -> bool:
    return (path / "run_config.yaml").exists() or (path / ".hydra" / "overrides.yaml").exists()


def find_run_dirs(paths: list[Path]) -> list[Path]:
    """Run directories under each path: the path itself, or a sweep's members (any depth, in
    Hydra's job order; a Slurm sweep's ``.submitit`` folder is skipped)."""
    out: list[Path] = []
    for p in paths:
        if is_run_dir(p):
            out.append(p)
            continue
        found = [d.parent for d in p.rglob("run_config.yaml") if ".submitit" not in d.parts]
        found += [d.parent.parent for d in p.rglob(".hydra/overrides.yaml") if ".submitit" not in d.parts]
        out += sorted(set(found), key=lambda d: [(len(x), x) for x in d.relative_to(p).parts])
    return list(dict.fromkeys(out))


def _overrides(run_dir: Path) -> dict[str, str]:
    f = run_dir / ".hydra" / "overrides.yaml"
    items = (yaml.safe_load(f.read_text()) or []) if f.exists() else []
    return dict(kv for x in items if (kv := split_override(x)))


def load_run(run_dir: Path) -> Run:
    """One run directory, in whatever state it is: a member that never got to write its
    ``run_config.yaml`` (a config error) is named from its Hydra overrides."""
    state, reason = run_state(run_dir)
    cfg_file = run_dir / "run_config.yaml"
    config = yaml.safe_load(cfg_file.read_text()) if cfg_file.exists() else {}
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    ov = _overrides(run_dir)
    recipe = (config.get("config", {}).get("recipe", {}) or {}).get("name") or ov.get("recipe", "bf16")
    seed = (config.get("config", {}).get("trainer", {}) or {}).get("seed", ov.get("trainer.seed", 0))
    return Run(
        name=run_dir.name,
        recipe=str(recipe),
        seed=int(seed),
        state=state,
        reason=reason,
        series=read_series(run_dir / "metrics.jsonl"),
        config=config,
        summary=summary,
        path=run_dir,
        url=wandb_url(run_dir),
    )


def wandb_url(run_dir: Path) -> str | None:
    """The W&B page of a run that logged online (``wandb/run-*`` directories; offline runs have none)."""
    import re

    for log in sorted(run_dir.glob("wandb/run-*/logs/debug.log")):
        m = re.search(r"(https?://\S+/runs/\w+)", log.read_text(errors="replace"))
        if m:
            return m.group(1)
    return None
