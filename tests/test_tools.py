"""The tools' convention (``python -m train.<tool>``: own flags, then Hydra overrides, one-line
errors), exercised through ``train.dryrun``; and the dry run's answers on the meta device."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from train import dryrun

from .conftest import ROOT


def test_dryrun_reports_what_the_recipe_would_do(capsys):
    dryrun.main(["+recipe=nvfp4"])
    out = capsys.readouterr().out
    assert "recipe nvfp4 (backend emulated): converted 8/9 Linear; kept in high precision: lm_head" in out
    assert "dY format: nvfp4; GEMM family: fp4" in out


def test_dryrun_json_plans_a_large_model_without_memory(capsys):
    dryrun.main(["--json", "--world-size", "8", "model=125m", "+recipe=mxfp8", "parallel=zero2"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["plan"]["world_size"] == 8 and plan["plan"]["micro_batch_size"] * 8 <= 512
    # GPT-3 125m shapes with the byte vocabulary (256 instead of GPT-2's 50257: 38.6 M fewer)
    assert 85e6 < plan["model"]["num_params"] < 88e6 and plan["model"]["vocab_size"] == 256
    assert (
        plan["recipe"]["grad_format"]["name"] == "mxfp8_e4m3"
        and plan["recipe"]["grad_format"]["scale_rule"] == "rceil"
    )
    assert plan["recipe"]["gemm_family"] == "fp8"


@pytest.mark.parametrize(
    "argv,key",
    [
        (["trainer.max_steps=abc"], "trainer.max_steps"),
        (["--world-size", "3", "trainer.global_batch_size=16"], "trainer.global_batch_size"),
        (["+recipe=nope"], "recipe"),
    ],
)
def test_tool_errors_are_one_line_and_exit_2(argv, key, capsys):
    with pytest.raises(SystemExit) as e:
        dryrun.main(argv)
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"lowbit: config error: {key}="), err


def test_dryrun_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "train.dryrun", "+recipe=fp8_delayed"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dY format: fp8_e5m2; GEMM family: fp8" in proc.stdout
