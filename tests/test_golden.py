"""Golden runs of one recipe of each quantizer kind: every logged number reproduces bit for bit.

The two plain-precision goldens (``tiny_fp32``, ``tiny_bf16``) run in ``test_train_runs.py``
on its shared fixture; these add MX, NVFP4 and each FP8 scaling kind, with stat steps, so a
refactor of the loop, the telemetry or the quantizers that moves any value fails here.
"""

from __future__ import annotations

import json
import warnings

import pytest

from .conftest import run_lowbit
from .golden import GOLDEN_DIR, OTHER_MACHINE_LOSS_ATOL, RECIPE_GOLDEN, golden_rows, same_machine


@pytest.mark.parametrize("name", sorted(RECIPE_GOLDEN))
def test_recipe_golden_run(name, tmp_path):
    golden = json.loads((GOLDEN_DIR / f"{name}.json").read_text())
    assert golden["command"] == RECIPE_GOLDEN[name]
    res = run_lowbit([*RECIPE_GOLDEN[name].split(), "logger=none"], run_dir=tmp_path / "run")
    rows = golden_rows(res.metrics)
    if not same_machine(golden):
        warnings.warn(
            f"{name}: recorded on {golden.get('signature')}; here only within {OTHER_MACHINE_LOSS_ATOL}",
            stacklevel=1,
        )
        assert [r["train/loss"] for r in rows] == pytest.approx(golden["losses"], abs=OTHER_MACHINE_LOSS_ATOL)
        return
    assert [r["train/loss"] for r in rows] == golden["losses"], (
        "loss curve moved: if the change is meant to touch numerics, regenerate with python -m scripts.update_golden"
    )
    assert rows == golden["rows"], "a logged value moved (losses equal): see the differing keys"
