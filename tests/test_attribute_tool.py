"""python -m train.attribute: the 2^3 GEMM subsets as Hydra multiruns, a planted wgrad effect found."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from train.attribute import member_overrides

# fwd and dgrad in MXFP8, wgrad (both operands) in MXFP4: the planted effect is in wgrad
PLANTED = [
    "+recipe=mxfp8_e4m3",
    "recipe.grad_output_wgrad_format=fp4_e2m1",
    "recipe.input_wgrad_format=fp4_e2m1",
]
FAST = ["trainer.max_steps=40", "trainer.eval_every=40", "trainer.log_every=1", "stats.every=0", "logger=none",
        "trainer.checkpoint_every=0"]  # fmt: skip


def tool(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.attribute", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_member_overrides_null_the_left_out_gemms():
    formats = {"input_format": "fp4_e2m1", "weight_format": "fp4_e2m1", "grad_output_format": "fp4_e2m1",
               "weight_dgrad_format": "fp4_e2m1", "input_wgrad_format": "fp4_e2m1",
               "grad_output_dgrad_format": "fp4_e2m1", "grad_output_wgrad_format": "fp4_e2m1"}  # fmt: skip
    user = ["+recipe=mxfp4_e2m1", "recipe.block_size=16", "trainer.max_steps=5"]
    only_dgrad = member_overrides(user, formats, "mxfp4_e2m1", ("dgrad",))
    assert only_dgrad[:3] == user and "recipe.name=mxfp4_e2m1.dgrad" in only_dgrad
    assert (
        "recipe.grad_output_dgrad_format=fp4_e2m1" in only_dgrad
        and "recipe.weight_dgrad_format=fp4_e2m1" in only_dgrad
    )
    for k in ("input_format", "weight_format", "grad_output_wgrad_format", "input_wgrad_format"):
        assert f"recipe.{k}=null" in only_dgrad
    assert member_overrides(user, formats, "mxfp4_e2m1", ()) == ["trainer.max_steps=5", "+recipe=bf16"]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["+recipe=bf16"],
            "lowbit: config error: recipe.quantizer=none: attribution needs a quantized recipe",
        ),
        (
            ["+recipe=mxfp4_e2m1", "trainer.seed=4"],
            "lowbit: config error: trainer.seed=4: train.attribute sets it",
        ),
        (["--seeds", "1", "+recipe=mxfp4_e2m1"], "lowbit: config error: --seeds=1: at least 2"),
        (
            ["+recipe=mxfp4_e2m1", "recipe.quantize_attention=true"],
            "lowbit: config error: recipe.quantize_attention=True",
        ),
    ],
)
def test_bad_input_is_one_line(args, line):
    proc = tool(*args)
    assert proc.returncode == 2 and proc.stderr.startswith(line), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_plan_counts_distinct_runs(tmp_path):
    proc = tool("--plan", "--out", str(tmp_path), "+recipe=mxfp4_e2m1", "recipe.input_format=null",
                "recipe.weight_format=null")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    # fwd quantizes nothing: 4 distinct subsets (bf16, dgrad, wgrad, dgrad+wgrad) x 3 seeds
    assert "4 distinct subsets x 3 seeds = 12 runs" in proc.stdout and "fwd quantize nothing" in proc.stdout


@pytest.mark.slow
def test_planted_wgrad_effect_is_attributed_to_wgrad(tmp_path):
    out = tmp_path / "attr"
    proc = tool("--seeds", "2", "--out", str(out), "--last-k", "10", *PLANTED, *FAST, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "attribution.json").read_text())
    assert res["seeds"] == [1, 2] and not res["missing"]
    sh = res["shapley"]
    assert sh["wgrad"]["verdict"].startswith("worse"), sh
    # the planted MXFP4 wgrad dominates; MXFP8 fwd/dgrad in 128-blocks are small but not nothing:
    # with BF16 GEMMs (less accumulation-order noise in the unquantized GEMMs) 2 seeds can resolve
    # the fwd share (~+0.0005 against wgrad's ~+0.003), so their verdicts are not asserted
    assert sh["wgrad"]["mean"] > 3 * max(abs(sh["fwd"]["mean"]), abs(sh["dgrad"]["mean"])), sh
    assert sum(sh[g]["mean"] for g in sh) == pytest.approx(res["full"]["mean"], abs=1e-9)
    assert (out / "attribution.png").stat().st_size > 1000 and (out / "attribution.md").exists()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(
        ["bf16", "fwd", "dgrad", "wgrad", "fwd+dgrad", "fwd+wgrad", "dgrad+wgrad", "fwd+dgrad+wgrad"]
    )
    # the sweep report on the tool's directory shows the attribution beside the member comparison
    rep = subprocess.run([sys.executable, "-m", "train.report", str(out), "--no-plots"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert rep.returncode == 0, rep.stderr[-2000:]
    page = (out / "report" / "index.html").read_text()
    assert "<h2 id='attribution'>Which GEMM" in page and "<img src='attribution.png'" in page
    assert (out / "report" / "attribution.png").stat().st_size > 1000
    # the same command again trains nothing: every member is read back
    again = tool("--seeds", "2", "--out", str(out), "--last-k", "10", *PLANTED, *FAST, timeout=300)
    assert again.returncode == 0 and "0 to train, 16 done" in again.stdout, again.stdout[-2000:]
    assert json.loads((out / "attribution.json").read_text())["shapley"] == sh
