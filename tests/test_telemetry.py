"""Telemetry end to end: every key family in metrics.jsonl and in the W&B offline run, stats under
ZeRO-3 with 2 ranks equal to one rank's, and the statistics' pure functions on known tensors."""

from __future__ import annotations

import math

import pytest

from tests.wandb_offline import find_run_files, read_run

from .conftest import run_lowbit

LAYER = "blocks.0.mlp.fc"
ARGS = ["trainer.max_steps=10", "trainer.log_every=5", "stats.every=5", "trainer.eval_sequences=16"]


def families(row: dict) -> set[str]:
    return {k.split("/")[0] for k in row}


def test_all_key_families_in_jsonl_and_wandb(tmp_path):
    res = run_lowbit(
        ["+recipe=bf16", "reference.mode=lockstep", "stats.shadow_formats=[mxfp4_e2m1,mxfp8_e4m3]", *ARGS],
        run_dir=tmp_path,
    )
    last = res.metrics[-1]
    assert {"train", "val", "perf", "div", "grad", "act", "weight", "shadow"} <= families(last)
    for key in (
        "perf/tflops",
        "perf/tokens_per_s_per_device",
        "perf/data_time_frac",
        "perf/max_rss_gib",
        "div/loss_delta",
        "div/loss_rel",
        "div/loss_delta_ema",
        f"div/weight_drift/{LAYER}",
        f"div/grad_cos/{LAYER}",
        "grad/global_norm",
        f"grad/{LAYER}/norm",
        f"grad/{LAYER}/absmax",
        f"grad/{LAYER}/zero_frac",
        f"grad/{LAYER}/weight_norm",
        f"act/{LAYER}/absmax",
        f"weight/{LAYER}/absmax",
        f"shadow/mxfp4_e2m1/{LAYER}/underflow_frac",
        f"shadow/mxfp4_e2m1/{LAYER}/overflow_frac",
        f"shadow/mxfp8_e4m3/{LAYER}/sqnr_db",
        f"shadow/mxfp4_e2m1/{LAYER}/act_underflow_frac",
        f"shadow/mxfp4_e2m1/{LAYER}/act_sqnr_db",
    ):
        assert key in last and math.isfinite(last[key]), key
    # MFU is not defined on a CPU: the keys are absent and the run config says why
    assert "perf/mfu_bf16_peak" not in last
    assert "not defined on cpu" in res.run_config["resolved"]["perf"]["mfu"]
    # FP4 loses more of the gradient than FP8
    assert last[f"shadow/mxfp4_e2m1/{LAYER}/sqnr_db"] < last[f"shadow/mxfp8_e4m3/{LAYER}/sqnr_db"]
    assert last[f"shadow/mxfp4_e2m1/{LAYER}/act_sqnr_db"] < last[f"shadow/mxfp8_e4m3/{LAYER}/act_sqnr_db"]
    assert last["grad/global_norm"] == last["train/grad_norm"]

    wb = read_run(find_run_files(res.run_dir)[0])
    assert wb["exit_code"] == 0
    hist = [{k: v for k, v in row.items() if not k.startswith("_")} for row in wb["history"]]
    assert [h["step"] for h in hist] == [m["step"] for m in res.metrics]
    for h, m in zip(hist, res.metrics):
        assert h == m
    assert wb["summary"]["div/first_divergence_step"] is None  # its own recipe never diverges


def test_mfu_with_a_configured_peak(tmp_path):
    res = run_lowbit(["stats.peak_tflops=0.05", "logger=none", *ARGS], run_dir=tmp_path)
    last = res.metrics[-1]
    assert last["perf/mfu_bf16_peak"] == pytest.approx(last["perf/tflops"] / 0.05)


@pytest.mark.dist
def test_stats_reduced_across_zero3_ranks_match_one_rank(tmp_path):
    common = ["+recipe=fp32", "stats.shadow_formats=[mxfp8_e4m3]", "logger=none", *ARGS]
    one = run_lowbit(["parallel=single", *common], run_dir=tmp_path / "one").metrics[-1]
    two = run_lowbit(
        ["parallel=zero3", "launcher.nproc_per_node=2", *common], run_dir=tmp_path / "two"
    ).metrics[-1]
    for key in (
        f"grad/{LAYER}/norm",
        f"grad/{LAYER}/weight_norm",
        f"weight/{LAYER}/absmax",
        f"act/{LAYER}/absmax",
        f"shadow/mxfp8_e4m3/{LAYER}/sqnr_db",
        f"shadow/mxfp8_e4m3/{LAYER}/act_sqnr_db",
    ):
        assert two[key] == pytest.approx(one[key], rel=1e-3), key
    assert two[f"shadow/mxfp8_e4m3/{LAYER}/underflow_frac"] == pytest.approx(
        one[f"shadow/mxfp8_e4m3/{LAYER}/underflow_frac"], abs=1e-4
    )


def test_issue_command_mxfp4_lockstep_writes_every_family(tmp_path):
    """The telemetry issue's command: +recipe=mxfp4_e2m1 reference.mode=lockstep stats.every=10 max_steps=50."""
    res = run_lowbit(
        [
            "+recipe=mxfp4_e2m1",
            "reference.mode=lockstep",
            "stats.every=10",
            "trainer.max_steps=50",
            "trainer.eval_sequences=16",
        ],
        run_dir=tmp_path,
    )
    rows = res.metrics
    stat = [r for r in rows if r["step"] % 10 == 0]
    assert [r["step"] for r in stat] == [10, 20, 30, 40, 50]
    for r in stat:
        assert {"train", "perf", "div", "grad", "act", "weight"} <= families(r)
        # against the recipe's own gradient format (MXFP4): FP4 underflows a visible share of dY
        assert 0 < r[f"grad/{LAYER}/underflow_frac"] < 1 and r[f"grad/{LAYER}/sqnr_db"] < 30
        assert r[f"div/weight_drift/{LAYER}"] > 0 and r["div/loss_delta"] != 0
    assert res.run_config["resolved"]["recipe"]["resolved_backend"] == "emulated"
    wb = read_run(find_run_files(res.run_dir)[0])
    hist = [{k: v for k, v in row.items() if not k.startswith("_")} for row in wb["history"]]
    by_step = {h["step"]: h for h in hist}
    for r in stat:
        h = by_step[r["step"]]
        assert h["grad/underflow_frac_hist/_type"] == "histogram"  # a W&B histogram per stat step
        assert {k: v for k, v in h.items() if "_hist" not in k} == {
            k: v for k, v in r.items() if "_hist" not in k
        }
    assert (
        "div/first_divergence_step" in wb["summary"]
        and wb["summary"]["final/train_loss"] == rows[-1]["train/loss"]
    )
