"""Runs for the report from W&B instead of the run directories: one ``Run`` per lowbit run.

``run_from_wandb`` is the one adapter; two producers feed it:

* ``offline_runs``: the ``run-*.wandb`` transaction logs that offline (or not yet synced) runs
  leave in ``<run dir>/wandb/``, read with ``train.review.wandb_files`` (no server, no network);
* ``online_runs``: a project's runs of one group, through ``wandb.Api()`` (needs a server).

What W&B holds of a lowbit run (``train.telemetry.loggers.WandbLogger``): the config is the run's
``run_config.yaml`` dict (``config``, ``resolved``, ``fingerprints``, ``env``), every history row
carries a ``step`` key, and the trainer's summary has ``state`` (``completed`` | ``preempted`` |
``nonfinite``). A run without a ``state`` in its summary did not finish training: W&B's exit
code says how far it got (see ``wandb_state``).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from train.review.runs import Run
from train.review.series import from_rows
from train.review.wandb_files import read_run
from train.sweep_index import STATES

_STAMP = re.compile(r"\d{8}_\d{6}")


def wandb_state(meta: dict[str, Any], summary: dict[str, Any]) -> tuple[str, str]:
    """(state, reason) in the sweep vocabulary (``train.sweep_index.STATES``).

    The trainer's ``summary["state"]`` when it wrote one. Else W&B's exit code
    (``meta["exit_code"]``): none yet means the run is in progress, or was killed before
    ``wandb.finish`` (W&B cannot tell these apart either); any exit code means the run ended
    without the trainer's summary, i.e. training raised (lowbit's logger finishes W&B with exit
    code 0 even then, so 0 is a failure too)."""
    state = summary.get("state")
    if isinstance(state, str) and state in STATES:
        return state, ""
    code = meta.get("exit_code")
    if code is None:
        return "running", ""
    return "failed", f"W&B run ended (exit code {code}) without the trainer's summary"


def run_from_wandb(
    meta: dict[str, Any],
    config: dict[str, Any],
    history: list[dict[str, Any]],
    summary: dict[str, Any],
    *,
    url: str | None,
) -> Run:
    """One ``Run`` from what W&B holds of it.

    ``meta``: ``name`` (the run's display name: lowbit names it after its run directory),
    ``exit_code`` (None while running), optionally ``run_id`` / ``group``; ``config``: the
    run_config dict as logged; ``history``: rows with a ``step`` key (W&B's own ``_step``,
    ``_runtime``, ``_timestamp`` columns are left out); ``summary``: the run's summary."""
    state, reason = wandb_state(meta, summary)
    cfg = config.get("config", {}) or {}
    recipe = (cfg.get("recipe", {}) or {}).get("name", "?")
    seed = (cfg.get("trainer", {}) or {}).get("seed", 0)
    rows = [{k: v for k, v in row.items() if not k.startswith("_")} for row in history]
    return Run(
        name=str(meta.get("name") or meta.get("run_id") or "?"),
        recipe=str(recipe),
        seed=int(seed),
        state=state,
        reason=reason,
        series=from_rows(rows),
        config=config,
        summary={k: v for k, v in summary.items() if not k.startswith("_")},
        url=url,
    )


def merge_histories(histories: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The histories of one run's W&B files (a run resumed from a checkpoint: the same steps
    logged again), in file order: a later file's row for a step replaces the earlier one; rows
    of one step within one file are merged. Rows without a ``step`` are left out. Sorted by step."""
    out: dict[int, dict[str, Any]] = {}
    for rows in histories:
        mine: dict[int, dict[str, Any]] = {}
        for row in rows:
            if row.get("step") is not None:
                mine.setdefault(int(row["step"]), {}).update(row)
        out.update(mine)
    return [out[s] for s in sorted(out)]


def _run_dirs_with_files(path: Path) -> dict[Path, list[Path]]:
    """lowbit run directory -> its W&B files (``<run dir>/wandb/<*run-*>/run-*.wandb``), in order
    of the W&B directory names (``offline-run-<timestamp>-<id>``: the order they were written)."""
    found: dict[Path, list[Path]] = defaultdict(list)
    for f in path.rglob("run-*.wandb"):
        if f.parent.parent.name == "wandb" and ".submitit" not in f.parts:
            found[f.parents[2]].append(f)
    return {d: sorted(set(fs), key=_written) for d, fs in found.items()}


def _written(f: Path) -> tuple[str, str]:
    m = _STAMP.search(f.parent.name)
    return (m.group(0) if m else "", f.parent.name)


def _order(root: Path, run_dir: Path) -> list[tuple[int, str]]:
    """Hydra's job order (``2`` before ``10``), as ``train.review.runs.find_run_dirs`` sorts."""
    rel = run_dir.relative_to(root).parts if run_dir != root else ()
    return [(len(x), x) for x in rel]


def offline_runs(paths: list[Path]) -> list[Run]:
    """Every lowbit run under ``paths`` (run directories or sweep directories) that has W&B
    files. One ``Run`` per run directory: the W&B files of a resumed run are one run (histories
    merged by ``merge_histories``; config and summary updated file by file, the last exit code
    counts). ``Run.path`` is the run directory; ``url`` is None (an offline run has no page)."""
    out: list[Run] = []
    seen: set[Path] = set()
    for root in paths:
        root = Path(root)
        groups = _run_dirs_with_files(root)
        for run_dir in sorted(groups, key=lambda d: _order(root, d)):
            if run_dir.resolve() in seen:
                continue
            seen.add(run_dir.resolve())
            meta: dict[str, Any] = {}
            config: dict[str, Any] = {}
            summary: dict[str, Any] = {}
            histories = []
            for f in groups[run_dir]:
                rec = read_run(f)
                meta.update({k: v for k, v in rec["run"].items() if v not in ("", None, [])})
                meta["exit_code"] = rec["exit_code"]
                config.update(rec["config"])
                summary.update(rec["summary"])
                histories.append(rec["history"])
            run = run_from_wandb(meta, config, merge_histories(histories), summary, url=None)
            run.path = run_dir
            out.append(run)
    return out


def online_runs(entity_project: str, group: str) -> list[Run]:
    """The runs of W&B group ``group`` in ``entity/project``, from the W&B server.

    UNVERIFIED: written against the public ``wandb.Api`` of wandb 0.31 (``Api.runs(path,
    filters)``, ``Run.config`` with the ``{"value": ...}`` envelopes already removed,
    ``Run.scan_history()``, ``Run.summary._json_dict``, ``Run.state``, ``Run.url``) and never run:
    there is no W&B server here. It needs an API key (``WANDB_API_KEY`` or ``wandb login``).
    W&B's run state maps to an exit code for ``wandb_state``: ``running`` / ``pending`` have
    none yet; ``finished`` is 0; ``crashed``, ``failed`` and ``killed`` are 1."""
    import wandb

    api = wandb.Api()
    out: list[Run] = []
    for r in api.runs(entity_project, filters={"group": group}, order="+created_at"):
        wstate = str(r.state).lower()
        meta = {
            "name": r.name,
            "run_id": r.id,
            "group": group,
            "exit_code": None if wstate in ("running", "pending") else 0 if wstate == "finished" else 1,
        }
        history = [dict(row) for row in r.scan_history()]
        summary = dict(r.summary._json_dict)
        out.append(run_from_wandb(meta, dict(r.config), history, summary, url=r.url))
    return out
