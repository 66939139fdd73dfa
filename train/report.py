"""Team review of a sweep: an offline HTML report, CSV/Markdown tables, a W&B Report spec and a
terminal summary, with a verdict per recipe calibrated to seed noise (``train.review.verdict``).

    python -m train.report outputs/sweeps/<stamp>                   # a Hydra multirun dir (local or Slurm)
    python -m train.report RUN_DIR RUN_DIR ... --out DIR            # any run directories
    python -m train.report SWEEP_DIR --from-wandb-files             # the same runs, read from their W&B files
    python -m train.report --wandb ENTITY/PROJECT --group NAME --out DIR   # runs pulled from W&B (online)
    python -m train.report SWEEP_DIR report.z=3 report.last_k=20 report.reference=fp32

Writes ``<out>/index.html`` (default ``SWEEP_DIR/report``) with PNG plots beside it,
``summary.csv``, ``summary.md`` and ``wandb_report.json``; saves the W&B Report only when online
credentials are present (and prints its URL). Runs in progress, failed, with NaN, without a
reference or with a different model/data are listed with what they are, never a crash. On the
``--out`` directory of ``train.attribute`` or ``train.sensitivity`` the page also shows that
tool's answer (``train.review.ablations``).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from recipes.errors import ConfigError
from train.cli import config_error_exit
from train.review.compare import ReportConfig


def parse_overrides(items: list[str]) -> ReportConfig:
    """``report.<field>=<value>`` overrides of ``ReportConfig``, each checked (a bad one is a config error)."""
    cfg = ReportConfig()
    types = {f.name: f.type for f in fields(ReportConfig)}
    for item in items:
        key, sep, value = item.partition("=")
        name = key.removeprefix("report.")
        if not sep or not key.startswith("report.") or name not in types:
            known = ", ".join(f"report.{n}" for n in types)
            raise ConfigError(key, value, f"not a report setting; known: {known}")
        try:
            parsed = {"float": float, "int": int}.get(str(types[name]), str)(value)
        except ValueError:
            raise ConfigError(key, value, f"must be a {types[name]}") from None
        if name in ("z", "last_k") and not parsed > 0:
            raise ConfigError(key, value, "must be > 0")
        cfg = replace(cfg, **{name: parsed})
    return cfg


def _args(argv: list[str] | None) -> tuple[argparse.Namespace, ReportConfig]:
    p = argparse.ArgumentParser(prog="python -m train.report", description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="*", help="a sweep dir, run dirs, and report.KEY=VALUE overrides")
    p.add_argument("--out", help="report directory (default: SWEEP_DIR/report)")
    p.add_argument("--title", help="report title (default: the sweep directory's name)")
    p.add_argument(
        "--wandb", metavar="ENTITY/PROJECT", help="pull runs from W&B (online) instead of run dirs"
    )
    p.add_argument("--group", help="the W&B group (a sweep) to pull with --wandb")
    p.add_argument(
        "--from-wandb-files", action="store_true", help="read the runs' offline W&B files, not metrics.jsonl"
    )
    p.add_argument("--no-plots", action="store_true", help="tables only")

    def refuse(message: str) -> None:
        raise ConfigError("arguments", " ".join(argv if argv is not None else sys.argv[1:]), message)

    p.error = refuse  # type: ignore[method-assign,assignment]  # one line, exit 2, like every lowbit error
    args = p.parse_intermixed_args(argv)
    overrides = [a for a in args.paths if "=" in a]
    args.paths = [Path(a) for a in args.paths if "=" not in a]
    cfg = parse_overrides(overrides)
    if args.wandb and (args.paths or not args.group or not args.out):
        raise ConfigError("--wandb", args.wandb, "pass --group NAME and --out DIR, and no run directories")
    if not args.wandb and not args.paths:
        raise ConfigError(
            "paths", "[]", "name a sweep directory or run directories (or --wandb ENTITY/PROJECT)"
        )
    for path in args.paths:
        if not path.is_dir():
            raise ConfigError("paths", path, "not a directory")
    if not args.out and len(args.paths) > 1:
        raise ConfigError("--out", None, "with several run directories, say where the report goes")
    return args, cfg


def _runs(args: argparse.Namespace) -> list:
    from train.review.runs import find_run_dirs, load_run

    if args.wandb:
        from train.review.wandb_runs import online_runs

        return online_runs(args.wandb, args.group)
    dirs = find_run_dirs(args.paths)
    if not dirs:
        raise ConfigError("paths", " ".join(map(str, args.paths)), "no run directory found there")
    if args.from_wandb_files:
        from train.review.wandb_runs import offline_runs

        return offline_runs(dirs)
    return [load_run(d) for d in dirs]


def build(args: argparse.Namespace, cfg: ReportConfig) -> Path:
    from train.review.compare import compare
    from train.review.page import print_table, write_page, write_tables

    t0 = time.perf_counter()
    runs = _runs(args)
    out = Path(args.out) if args.out else args.paths[0] / "report"
    out.mkdir(parents=True, exist_ok=True)
    sweep = args.group or (args.paths[0].resolve().name if args.paths else "sweep")
    title = args.title or f"lowbit sweep {sweep}"
    cmp = compare(runs, cfg)
    print(f"lowbit: report: {len(runs)} runs, {len(cmp.rows)} recipes, reference {cfg.reference} "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)  # fmt: skip
    plots = []
    if not args.no_plots:
        from train.review.plots import figures, save

        plots = figures(cmp, title=title)
        save(plots, out)
    write_tables(out, cmp)
    from train.review.ablations import sections

    extras = sections([Path(x) for x in args.paths or []], out)
    page = write_page(out, cmp, runs, plots, title=title, extras=extras)
    _wandb_report(cmp, args, out, title=title, group=sweep, runs=runs)
    print_table(cmp, title=title)
    print(f"lowbit: report {page} ({len(plots)} plots, {time.perf_counter() - t0:.1f} s)", flush=True)
    return page


def _wandb_report(
    cmp: Any, args: argparse.Namespace, out: Path, *, title: str, group: str, runs: list
) -> None:
    from train.review.wandb_report import build_report, save_online, write_spec

    entity, _, project = (args.wandb or "").partition("/")
    if not args.wandb:
        cfgs = [r.config.get("config", {}).get("logger", {}).get("wandb", {}) for r in runs if r.config]
        entity = next((c.get("entity") for c in cfgs if c.get("entity")), None) or "lowbit"
        project = next((c.get("project") for c in cfgs if c.get("project")), None) or "lowbit"
        group = next((c.get("group") for c in cfgs if c.get("group")), None) or group
    report = build_report(cmp, entity=entity, project=project, group=group, title=title)
    write_spec(report, out / "wandb_report.json")
    url = save_online(report)
    if url:
        print(f"lowbit: W&B report {url}", flush=True)


def main(argv: list[str] | None = None) -> None:
    try:
        args, cfg = _args(argv)
        build(args, cfg)
    except ConfigError as e:
        config_error_exit(e)


if __name__ == "__main__":
    main()
