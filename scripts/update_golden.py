"""Regenerate tests/assets/losses/*.json: only for changes that are meant to touch numerics.

    python scripts/update_golden.py
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import run_lowbit  # noqa: E402
from tests.test_train_runs import COMMON_GOLDEN, GOLDEN  # noqa: E402


def main() -> None:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    for name, command in COMMON_GOLDEN.items():
        with tempfile.TemporaryDirectory() as tmp:
            res = run_lowbit(command.split() + ["logger=none"], run_dir=Path(tmp) / "run")
            losses = [r["train/loss"] for r in res.metrics]
        import torch

        record = {"command": command, "losses": losses, "torch": torch.__version__, "machine": platform.machine()}
        (GOLDEN / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"{name}: {len(losses)} steps, final {losses[-1]:.6f}")


if __name__ == "__main__":
    main()
