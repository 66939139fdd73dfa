"""The parity harness (``python -m train.parity``) and the torch backend end to end through ``train/run.py``."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from train import parity

from .conftest import ROOT, run_lowbit


@pytest.fixture(scope="module")
def rowwise(tmp_path_factory):
    path = tmp_path_factory.mktemp("parity") / "parity.json"
    proc = subprocess.run(
        [sys.executable, "-m", "train.parity", "--json", str(path), "--steps", "2", "--sequences", "2",
         "+recipe=fp8_rowwise"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(path.read_text())


def test_parity_table_has_every_implementation_and_torchao(rowwise):
    out, result = rowwise
    rows = {r["impl"]: r for r in result["rows"]}
    assert list(rows) == list(parity.IMPLEMENTATIONS)
    assert "torchao Float8Linear (rowwise)" in out and "parity: fp8_rowwise" in out
    assert rows["te"]["skipped"] and "Transformer Engine" in rows["te"]["skipped"]  # no TE on this machine
    assert rows["bf16"]["fwd_sqnr_db"] == math.inf
    for impl in ("emulated", "torch", "torchao"):
        r = rows[impl]
        assert not r["skipped"] and 15 < r["fwd_sqnr_db"] < 60 and 15 < r["wgrad_sqnr_db"] < 60, r
        assert math.isfinite(r["loss"]) and abs(r["loss"] - rows["bf16"]["loss"]) < 0.1
    # rowwise power-of-two scales: lowbit's torch backend and its emulation give the same numbers
    assert rows["torch"]["fwd_sqnr_db"] == rows["emulated"]["fwd_sqnr_db"]
    assert rows["torch"]["loss"] == rows["emulated"]["loss"]
    # torchao's rowwise casts of the same input and weight: the same FP8 codes as lowbit's
    assert rows["torchao"]["x_codes_equal"] > 0.999 and rows["torchao"]["w_codes_equal"] > 0.999
    assert any("power-of-two" in n for n in rows["torchao"]["semantics"])


def test_parity_rejects_a_plain_recipe_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "train.parity", "+recipe=bf16"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("lowbit: config error: recipe=bf16:")


def test_torch_backend_trains_and_tracks_the_emulated_run(tmp_path):
    """20 steps of fp8_delayed, real FP8 GEMMs against the emulated twin: the first step is bitwise
    equal (every scale is 1.0); later delayed scales are not powers of two, and the emulated code
    GEMMs (the same FP8 codes and ``1/s``) round their BF16 product once more on the CPU before
    the scale (``recipes.qlinear``), so the curves part by rounding only."""
    common = ["+recipe=fp8_delayed", "trainer.max_steps=20", "trainer.log_every=1", "trainer.eval_every=20",
              "trainer.eval_sequences=16", "logger=none"]  # fmt: skip
    real = run_lowbit([*common, "recipe.backend=torch"], run_dir=tmp_path / "torch")
    emu = run_lowbit([*common, "recipe.backend=emulated"], run_dir=tmp_path / "emulated")
    rec = real.run_config["resolved"]["recipe"]
    assert rec["resolved_backend"] == "torch" and rec["gemm_impl"].startswith("torch._scaled_mm on cpu")
    assert emu.run_config["resolved"]["recipe"]["gemm_impl"].startswith("emulated")
    a, b = real.losses(), emu.losses()
    assert a[1] == b[1]
    assert max(abs(a[s] - b[s]) for s in a) < 5e-3
    assert a[20] < a[1] - 0.5
