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


@pytest.mark.dist
def test_probe_stats_of_two_zero3_ranks_equal_one_rank(tmp_path):
    """Step 1 of mxfp8_e4m3: 2 ZeRO-3 ranks run the same micro-batch GEMMs as 1 rank with 2
    micro-batches (a GEMM's error is that of the GEMMs run: one wgrad over 16 sequences is not
    two over 8, so the micro-batch size is pinned); GEMM errors, block fractions and the dY scale histogram (normalised to the
    global mean loss) agree, and so do the update and optimizer-state keys."""
    common = ["+recipe=mxfp8_e4m3", "stats.every=1", "trainer.max_steps=1", "trainer.eval_sequences=16",
              "trainer.micro_batch_size=8", "logger=none"]  # fmt: skip
    one = run_lowbit(["parallel=single", *common], run_dir=tmp_path / "one").metrics[-1]
    two = run_lowbit(
        ["parallel=zero3", "launcher.nproc_per_node=2", *common], run_dir=tmp_path / "two"
    ).metrics[-1]
    keys = [k for k in one if k.startswith(("gemm/", "scales/")) and LAYER in k]
    assert len(keys) == 12 + 5 * 6, keys  # 3 GEMMs x 4 keys; 5 roles x (5 fractions, a histogram)
    for key in keys:
        if key.endswith("_hist"):
            assert two[key] == one[key], key
        else:
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
    for key in (f"act/{LAYER}/kurtosis", f"update/{LAYER}/ratio", f"weight/{LAYER}/absmax"):
        assert two[key] == pytest.approx(one[key], rel=1e-4), key  # FP32 masters under ZeRO-0 and -3
    for kind in ("bf16", "e4m3"):
        key = f"opt/{LAYER}/exp_avg_sq_underflow_{kind}"
        assert two[key] == pytest.approx(one[key], abs=1e-4), key


def test_fp8_delayed_keys_follow_the_amax_history(tmp_path):
    """Every ``fp8/`` key of delayed scaling, checked against its definition: the scale is
    ``max / amax_history_max`` (margin 0), the history histogram holds each step's amax once in
    its binade, and ``amax`` (the newest) and the window's max sit in its occupied bins."""
    res = run_lowbit(["+recipe=fp8_delayed", "stats.every=3", "trainer.max_steps=6", "trainer.log_every=1",
                      "trainer.eval_sequences=16", "logger=none"], run_dir=tmp_path)  # fmt: skip
    rows = {r["step"]: r for r in res.metrics}
    for step in (3, 6):
        r = rows[step]
        names = sorted(
            {k[len("fp8/") : k.rindex("/")] for k in r if k.startswith("fp8/") and k.count("/") > 2}
        )
        assert len(names) == 3 * 8  # input, weight, grad_output of 8 converted Linears
        for name in names:
            p = f"fp8/{name}/"
            assert {k for k in r if k.startswith(p)} == {p + s for s in ("scale", "amax", "amax_history_max",
                                                                         "amax_history_hist")}  # fmt: skip
            fmax = 57344.0 if name.endswith("grad_output") else 448.0
            assert r[p + "scale"] == pytest.approx(fmax / r[p + "amax_history_max"], rel=1e-6)
            h = r[p + "amax_history_hist"]
            assert h["_type"] == "histogram" and sum(h["values"]) == step  # one amax per optimizer step
            lo, hi = h["bins"][0], h["bins"][-1]
            for v in (r[p + "amax"], r[p + "amax_history_max"]):
                e = math.floor(math.log2(v))
                assert lo <= e < hi and h["values"][int(e - lo)] > 0
            assert math.floor(math.log2(r[p + "amax_history_max"])) == hi - 1  # the top bin holds the max


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
        assert {
            "train",
            "perf",
            "div",
            "grad",
            "act",
            "weight",
            "gemm",
            "scales",
            "update",
            "opt",
        } <= families(r)
        assert r[f"act/{LAYER}/kurtosis"] > 1  # 1 is the minimum of any distribution
        for gemm, roles in (("fwd", ("input", "weight")), ("dgrad", ("grad_output", "weight_dgrad")),
                            ("wgrad", ("grad_output", "input_wgrad"))):  # fmt: skip
            g = f"gemm/{LAYER}/{gemm}"
            assert 0 < r[f"{g}/rel_error"] < 1 and r[f"{g}/sqnr_db"] == pytest.approx(
                -20 * math.log10(r[f"{g}/rel_error"]), abs=1e-3
            )
            assert all(r[f"{g}/{role}_sqnr_db"] > r[f"{g}/sqnr_db"] for role in roles)
        for role in ("input", "weight", "grad_output", "weight_dgrad", "input_wgrad"):
            sc = f"scales/{LAYER}/{role}"
            hist = r[f"{sc}/log2_scale_hist"]
            assert hist["_type"] == "histogram" and len(hist["bins"]) == len(hist["values"]) + 1
            assert 0 <= r[f"{sc}/saturated_frac"] <= 1 and r[f"{sc}/dyn_range_log2"] > 0
        assert 0 < r[f"update/{LAYER}/ratio"] < 0.5
        assert (
            0
            <= r[f"opt/{LAYER}/exp_avg_sq_underflow_bf16"]
            <= r[f"opt/{LAYER}/exp_avg_sq_underflow_e4m3"]
            <= 1
        )
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
        blocks = f"scales/{LAYER}/grad_output/log2_scale_hist"  # pre-binned: W&B keeps our bins
        assert h[f"{blocks}/_type"] == "histogram"
        assert h[f"{blocks}/bins"] == r[blocks]["bins"] and h[f"{blocks}/values"] == r[blocks]["values"]
        assert {k: v for k, v in h.items() if "_hist" not in k} == {
            k: v for k, v in r.items() if "_hist" not in k
        }
    assert (
        "div/first_divergence_step" in wb["summary"]
        and wb["summary"]["final/train_loss"] == rows[-1]["train/loss"]
    )
