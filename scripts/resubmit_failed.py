"""Resubmit the members of a Hydra sweep that did not complete, into their own run directories.

    python -m scripts.resubmit_failed SWEEP_DIR            # resubmit
    python -m scripts.resubmit_failed SWEEP_DIR --dry-run  # print the commands only

Each ``running`` (started, never finished: killed), ``preempted``, ``failed`` or ``missing`` job
(see SWEEP_DIR/sweep.json, rebuilt from the job directories; the states are
``train.sweep_index.STATES``) is submitted again; run it once the sweep has ended. A
``config_error`` or ``nonfinite`` member is not (a rerun fails the same way: fix the override,
or the recipe, and rerun that member by hand), nor is a completed one. It is submitted again with its original overrides, its original
Hydra launcher settings (``hydra/launcher=slurm``, partition, ...), and
``hydra.sweep.dir=SWEEP_DIR hydra.sweep.subdir=<its number>``, so it lands in
the same run directory and ``trainer.resume=auto`` continues from its latest
checkpoint (or starts over when it has none). sweep.json is rewritten at the end.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from train.sweep_index import build_index

ROOT = Path(__file__).resolve().parents[1]

#: states a rerun cannot change (completed) or would repeat (a config error)
NOT_RESUBMITTED = ("completed", "config_error", "nonfinite")

_DROP = (
    "hydra.sweep.dir=",
    "hydra.sweep.subdir=",
    "hydra.run.dir=",
    "hydra.mode=",
    "hydra.job.num=",
    "hydra.job.id=",
)


def resubmit_commands(sweep_dir: Path) -> list[list[str]]:
    cmds = []
    for job in build_index(sweep_dir)["jobs"]:
        if job["state"] in NOT_RESUBMITTED:
            continue
        hydra_cfg = yaml.safe_load((Path(job["run_dir"]) / ".hydra" / "hydra.yaml").read_text())["hydra"]
        launcher = [o for o in hydra_cfg["overrides"]["hydra"] if not o.startswith(_DROP)]
        cmds.append(
            [
                sys.executable,
                str(ROOT / "train" / "run.py"),
                "-m",
                *launcher,
                *job["overrides"],
                f"hydra.sweep.dir={sweep_dir}",
                f"hydra.sweep.subdir={job['num']}",
            ]
        )
    return cmds


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python -m scripts.resubmit_failed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    sweep_dir = args.sweep_dir.resolve()
    cmds = resubmit_commands(sweep_dir)
    print(f"{len(cmds)} job(s) to resubmit in {sweep_dir}")
    failed = 0
    for cmd in cmds:
        print("+", shlex.join(cmd[1:]), flush=True)
        if not args.dry_run:
            failed += subprocess.run(cmd, cwd=ROOT).returncode != 0
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
