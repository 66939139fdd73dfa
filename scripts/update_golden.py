"""Regenerate tests/assets/losses/*.json: only for changes that are meant to touch numerics.

python scripts/update_golden.py            # all
python scripts/update_golden.py tiny_nvfp4 # some
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import run_lowbit  # noqa: E402
from tests.golden import GOLDEN_DIR, RECIPE_GOLDEN, golden_rows, machine_signature  # noqa: E402
from tests.test_train_runs import COMMON_GOLDEN  # noqa: E402


def main(names: list[str]) -> None:
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    every = {**COMMON_GOLDEN, **RECIPE_GOLDEN}
    for name in names or list(every):
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
    main(sys.argv[1:])
