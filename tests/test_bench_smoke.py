"""The benches and scripts run as modules from the checkout root (no sys.path edits).

Smoke only: the overhead ratio must parse, its value is not checked (timing is the
owner's measurement on a quiet machine, not a test)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

TABLE_HEADER = "| recipe | lowbit s | plain s | ratio (median) | spread | rounds |"


def run_module(*args: str, timeout: int = 120) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_overhead_bench_prints_the_table():
    out = run_module("bench.overhead", "--steps", "3", "--reps", "1", "--warmup", "0", "--recipes", "fp32")
    lines = out.strip().splitlines()
    assert TABLE_HEADER in lines, out[-2000:]
    row = lines[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "fp32" and cells[-1] == "1", row
    lowbit_s, plain_s, ratio = (float(c) for c in cells[1:4])
    assert lowbit_s > 0 and plain_s > 0 and ratio > 0, row


def test_update_golden_lists_without_running():
    out = run_module("scripts.update_golden", "--list", timeout=60)
    names = [line.split(":", 1)[0] for line in out.strip().splitlines()]
    assert "tiny_fp32" in names and "tiny_bf16" in names, out


def test_stats_overhead_bench_runs():
    out = run_module("bench.stats_overhead", "--steps", "3", "--reps", "1", "--warmup", "0", "--every", "3")
    last = out.strip().splitlines()[-1]
    assert last.startswith("stats overhead ratio: "), out[-2000:]
    assert float(last.split(": ", 1)[1].split("x", 1)[0]) > 0, last


def test_scaled_mm_bench_prints_its_table():
    out = run_module("bench.scaled_mm", "--shapes", "32x64x48", "--reps", "2")
    rows = [line for line in out.splitlines() if line.startswith("| 32x64x48 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["rowwise", "tensorwise", "fp32 mm", "bf16 mm"], out
    assert all(float(r.split("|")[3]) > 0 for r in rows)


def test_recipe_step_bench_times_both_fp8_backends():
    out = run_module("bench.recipe_step", "--recipes", "fp8_current", "--backends", "emulated", "torch",
                     "--floor", "--steps", "2", "--warmup", "1", "--batch", "2", timeout=300)  # fmt: skip
    labels = [
        line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "---" not in line
    ]
    assert labels == ["recipe", "bf16", "fp8_current emulated", "fp8_current emulated floor (identity quantizers)",
                      "fp8_current torch"], out  # fmt: skip
    widths = {line.count("|") for line in out.splitlines() if line.startswith("|")}
    assert len(widths) == 1, f"header and rows have different column counts: {out}"


def test_report_scale_bench_times_table_and_report():
    out = run_module("bench.report_scale", "--runs", "5", "--steps", "120", "--reps", "1", timeout=180)
    rows = {
        line.split("|")[1].strip(): line
        for line in out.splitlines()
        if line.startswith("| t") or line.startswith("| r")
    }
    assert set(rows) == {"table", "report"}, out[-2000:]
    assert all(float(r.split("|")[2]) > 0 for r in rows.values())


def test_early_warning_bench_runs_its_inducers_against_their_plain_twins(tmp_path):
    # one seed, 16 steps, the inducers from step 10: too short to warn, long enough for the
    # reference (the plain run) to be accepted and the table and goal lines to be printed
    out = run_module("bench.early_warning", "--seeds", "1", "--steps", "16", "--at", "10", "--out", str(tmp_path),
                     timeout=300)  # fmt: skip
    assert "| inducer | seed | first warning (step >= 10) |" in out, out[-2000:]
    assert "lead >= 10 steps to the first divergence:" in out and "false warnings on the plain runs: " in out
    rows = {(r["inducer"], r["seed"]) for r in json.loads((tmp_path / "early_warning.json").read_text())}
    assert rows == {("none", 1), ("lr", 1), ("outlier", 1)}
    cfg = (tmp_path / "lr_seed1" / ".hydra" / "overrides.yaml").read_text()
    assert "reference.run_dir=" in cfg and "none_seed1" in cfg and "debug.lr_boost_at_step=10" in cfg


def test_floor_layers_quantize_nothing_and_keep_the_gemm_dtype():
    """The floor's converted Linear gives nn.Linear's BF16 result: no operand changed."""
    import torch
    from torch import nn

    from bench.recipe_step import identity_quantizers
    from recipes.fp8 import get_format
    from recipes.qlinear import LinearQuantizers, QuantLinear
    from recipes.quantizers import FP8CurrentRole

    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    role = FP8CurrentRole(get_format("e4m3"))
    holder = nn.Module()
    holder.fc = QuantLinear.from_linear(lin, LinearQuantizers(role, role, role, role, role, gemm="bf16"))
    x = torch.randn(16, 64).to(torch.bfloat16)
    assert not torch.equal(holder.fc(x), lin(x))  # quantized
    assert identity_quantizers(holder) == 1
    assert torch.equal(holder.fc(x), lin(x))
