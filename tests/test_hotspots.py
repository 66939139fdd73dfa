"""train.review.hotspots: which layer, GEMM and operand a run's quantization error sits in."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

from train.review.hotspots import hotspots, render
from train.review.series import from_rows

ROOT = Path(__file__).resolve().parents[1]


def _rows() -> list[dict]:
    # two stat steps, two layers; the means are what hotspots reports
    return [
        {"step": 10, "gemm/a/fwd/sqnr_db": 20.0, "gemm/b/fwd/sqnr_db": 10.0,
         "gemm/b/fwd/input_sqnr_db": 30.0, "gemm/b/fwd/weight_sqnr_db": 12.0,
         "gemm/a/wgrad/sqnr_db": 8.0, "gemm/a/wgrad/grad_output_sqnr_db": 9.0,
         "gemm/a/wgrad/input_wgrad_sqnr_db": 25.0, "gemm/a/wgrad/rel_error": 0.4,
         "scales/a/input/zero_block_frac": 0.1, "scales/b/grad_output/zero_block_frac": 0.3,
         "scales/b/weight/saturated_frac": 0.0},
        {"step": 11, "train/loss": 2.0},
        {"step": 20, "gemm/a/fwd/sqnr_db": 22.0, "gemm/b/fwd/sqnr_db": 12.0,
         "gemm/b/fwd/input_sqnr_db": 32.0, "gemm/b/fwd/weight_sqnr_db": 14.0,
         "gemm/a/wgrad/sqnr_db": 6.0, "gemm/a/wgrad/grad_output_sqnr_db": 7.0,
         "gemm/a/wgrad/input_wgrad_sqnr_db": 27.0, "gemm/a/wgrad/rel_error": 0.5,
         "scales/a/input/zero_block_frac": 0.5, "scales/b/grad_output/zero_block_frac": 0.1,
         "scales/b/weight/saturated_frac": 0.0},
    ]  # fmt: skip


def test_hotspots_of_a_hand_made_run() -> None:
    spots = hotspots(from_rows(_rows()))
    fwd = spots["gemms"]["fwd"]
    assert fwd["mean_sqnr_db"] == (21.0 + 11.0) / 2
    assert (fwd["worst_layer"], fwd["worst_sqnr_db"]) == ("b", 11.0)
    assert (fwd["costliest_operand"], fwd["operand_sqnr_db"]) == ("weight", 13.0)
    wgrad = spots["gemms"]["wgrad"]
    assert (wgrad["worst_layer"], wgrad["costliest_operand"], wgrad["operand_sqnr_db"]) == (
        "a",
        "grad_output",
        8.0,
    )
    assert "dgrad" not in spots["gemms"]  # no dgrad keys logged
    # zero_block_frac means: a/input 0.3, b/grad_output 0.2 -> a/input; with --last: 0.5 at a/input too
    assert spots["scales"]["zero_block_frac"] == {"value": 0.3, "layer": "a", "role": "input"}
    assert spots["scales"]["saturated_frac"]["value"] == 0.0
    last = hotspots(from_rows(_rows()), last=True)
    assert last["gemms"]["fwd"]["worst_sqnr_db"] == 12.0
    assert math.isclose(last["scales"]["zero_block_frac"]["value"], 0.5)
    text = render("run", spots)
    assert "| fwd | 16.0 | b | 11.0 | weight (13.0) |" in text
    assert "| wgrad | 7.0 | a | 7.0 | grad_output (8.0) |" in text


def test_no_run_dir_is_a_config_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "train.review.hotspots", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("lowbit: config error: runs=")
