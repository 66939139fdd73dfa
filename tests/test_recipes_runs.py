"""Every quantized recipe preset runs through the real entry point and records what ran (3 steps each, ~5 s)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from .conftest import run_lowbit

SHORT = ["trainer.max_steps=3", "trainer.eval_sequences=16", "logger=none"]
#: the quantized presets: every conf/recipe/*.yaml whose kind is not ``none`` (presets are data)
QUANTIZED_PRESETS = sorted(
    f.stem
    for f in (Path(__file__).resolve().parents[1] / "conf" / "recipe").glob("*.yaml")
    if (yaml.safe_load(f.read_text()) or {}).get("quantizer", "none") != "none"
)


@pytest.mark.parametrize("recipe", QUANTIZED_PRESETS)
def test_recipe_runs_and_records_backend_and_conversion(recipe, tmp_path: Path):
    res = run_lowbit([f"+recipe={recipe}", *SHORT], run_dir=tmp_path / recipe, timeout=300)
    out = res.proc.stdout + res.proc.stderr
    assert f"recipe.backend=auto resolved to 'emulated' on cpu (no hardware backend for {recipe})" in out
    rec = res.run_config["resolved"]["recipe"]
    assert rec["resolved_backend"] == "emulated"
    assert rec["conversion"] == "converted 8/9 Linear; kept in high precision: lm_head"
    assert rec["kept"] == ["lm_head"] and len(rec["converted"]) == 8
    assert rec["config"]["precision"] == "bf16" and rec["quantizer"] == rec["config"]["quantizer"]
    last = res.metrics[-1]
    assert last["step"] == 3 and math.isfinite(last["train/loss"]) and math.isfinite(last["val/loss"])


def test_hardware_backend_is_a_one_line_config_error(tmp_path: Path):
    res = run_lowbit(
        ["+recipe=mxfp8", "recipe.backend=te", *SHORT], run_dir=tmp_path / "run", check=False, timeout=120
    )
    assert res.proc.returncode == 2, res.proc.stderr
    lines = [line for line in res.proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        "lowbit: config error: recipe.backend=te: Transformer Engine needs a CUDA GPU"
    ), lines
    assert "recipe.backend=emulated" in lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
