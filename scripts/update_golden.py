"""Regenerate tests/assets/losses/*.json: only for changes that are meant to touch numerics.

From the checkout root (``tests`` and ``scripts`` import from there):

    python -m scripts.update_golden               # all
    python -m scripts.update_golden tiny_nvfp4    # some
    python -m scripts.update_golden --list        # the golden names and their commands; runs nothing
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from tests.conftest import run_lowbit
from tests.golden import GOLDEN_DIR, RECIPE_GOLDEN, golden_rows, machine_signature
from tests.test_train_runs import COMMON_GOLDEN


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python -m scripts.update_golden",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("names", nargs="*", help="golden names to regenerate (default: all)")
    ap.add_argument("--list", action="store_true", help="print the golden names and commands, run nothing")
    args = ap.parse_args()
    every = {**COMMON_GOLDEN, **RECIPE_GOLDEN}  # name -> the Hydra overrides that record it
    if args.list:
        for name, command in every.items():
            print(f"{name}: {command}")
        return
    if unknown := [n for n in args.names if n not in every]:
        ap.error(f"unknown golden name(s) {', '.join(unknown)}; choose from: {', '.join(every)}")
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    for name in args.names or list(every):
        command = every[name]
        with tempfile.TemporaryDirectory() as tmp:
            res = run_lowbit(command.split() + ["logger=none"], run_dir=Path(tmp) / "run")
            metrics = res.metrics
        losses = [r["train/loss"] for r in metrics]
        record = {"command": command, "losses": losses, "signature": machine_signature()}
        if name in RECIPE_GOLDEN:
            record["rows"] = golden_rows(metrics)
        (GOLDEN_DIR / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"{name}: {len(losses)} steps, final {losses[-1]:.6f}", flush=True)


if __name__ == "__main__":
    main()
