"""Loss divergence against a reference: pure functions, lockstep exactness, refusal of a wrong reference."""

from __future__ import annotations

import math

import pytest
import torch

from train.telemetry.divergence import (
    DivergenceTracker,
    cosine,
    is_spike,
    loss_divergence,
    reference_mismatch,
    relative_drift,
)

from .conftest import run_lowbit


def test_pure_functions_known_answers():
    assert loss_divergence(2.2, 2.0) == pytest.approx({"div/loss_delta": 0.2, "div/loss_rel": 0.1})
    assert relative_drift(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 4.0])).item() == pytest.approx(0.75)
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])).item() == pytest.approx(
        1 / math.sqrt(2)
    )
    assert cosine(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0])).item() == pytest.approx(1.0, abs=1e-15)


def test_spike_rule():
    flat = [2.0 + 0.01 * (i % 3) for i in range(20)]
    assert not is_spike(flat, 2.02)
    assert is_spike(flat, 2.5)
    assert not is_spike(flat[:5], 2.5)  # too little history
    assert not is_spike([2.0] * 20, 2.05)  # 2.5% jump: below min_rel even with zero variance
    assert is_spike(flat, float("nan"))


def test_tracker_first_divergence_step():
    tr = DivergenceTracker(threshold=0.05, decay=0.5)
    for step, (loss, ref) in enumerate([(2.0, 2.0), (2.1, 2.0), (2.2, 2.0), (2.4, 2.0)], start=1):
        out = tr.update(step, loss, ref)
    # rel: 0, .05, .1, .2 -> ema: 0, .025, .0625, .13125 -> first > 0.05 at step 3
    assert tr.first_divergence_step == 3
    assert out["div/loss_rel_ema"] == pytest.approx(0.13125)
    assert tr.summary()["div/first_divergence_step"] == 3


def test_reference_mismatch_names_the_difference():
    ours = {
        "config": {
            "model": {"name": "tiny", "d_model": 128},
            "data": {"source": "shakespeare"},
            "trainer": {"seed": 1, "global_batch_size": 16},
        }
    }
    same = {
        "config": {
            "model": {"name": "x", "d_model": 128},
            "data": {"source": "shakespeare"},
            "trainer": {"seed": 1, "global_batch_size": 16},
        }
    }
    assert reference_mismatch(ours, same) is None
    other_seed = {"config": {**same["config"], "trainer": {"seed": 2, "global_batch_size": 16}}}
    assert "seed" in reference_mismatch(ours, other_seed)
    other_model = {"config": {**same["config"], "model": {"d_model": 256}}}
    msg = reference_mismatch(ours, other_model)
    assert "model" in msg and "d_model" in msg and "256" in msg


ARGS = ["trainer.max_steps=12", "trainer.log_every=3", "trainer.eval_sequences=16", "logger=none"]


@pytest.fixture(scope="module")
def bf16_reference(tmp_path_factory):
    return run_lowbit(["+recipe=bf16", *ARGS], run_dir=tmp_path_factory.mktemp("ref") / "bf16")


def test_lockstep_against_own_recipe_is_exactly_zero(tmp_path):
    res = run_lowbit(["+recipe=bf16", "reference.mode=lockstep", "stats.every=6", *ARGS], run_dir=tmp_path)
    rows = res.metrics
    assert all(r["div/loss_delta"] == 0.0 for r in rows)
    stat_rows = [r for r in rows if r["step"] % 6 == 0]
    assert stat_rows and all(r["div/weight_drift/blocks.0.mlp.fc"] == 0.0 for r in stat_rows)
    assert all(r["div/grad_cos/blocks.1.attn.qkv"] == pytest.approx(1.0, abs=1e-12) for r in stat_rows)
    assert "div/weight_drift/blocks.0.mlp.fc" not in rows[0]  # heavy keys only on stat steps


def test_lockstep_fp32_run_against_bf16_reference_drifts(tmp_path):
    res = run_lowbit(
        ["+recipe=fp32", "reference.mode=lockstep", "reference.precision=bf16", "stats.every=6", *ARGS],
        run_dir=tmp_path,
    )
    last = res.metrics[-1]
    assert last["div/loss_delta"] != 0.0 and abs(last["div/loss_rel"]) < 0.05
    assert 0 < last["div/weight_drift/blocks.0.mlp.fc"] < 0.5
    assert 0.9 < last["div/grad_cos/blocks.0.mlp.fc"] < 1.0


def test_run_dir_reference_deltas_and_refusal(bf16_reference, tmp_path):
    ref_losses = bf16_reference.losses()
    res = run_lowbit(
        ["+recipe=fp32", f"reference.run_dir={bf16_reference.run_dir}", *ARGS], run_dir=tmp_path / "a"
    )
    for r in res.metrics:
        assert r["div/loss_delta"] == pytest.approx(r["train/loss"] - ref_losses[r["step"]], abs=1e-12)
    bad = run_lowbit(
        ["+recipe=fp32", f"reference.run_dir={bf16_reference.run_dir}", "trainer.seed=99", *ARGS],
        run_dir=tmp_path / "b",
        check=False,
    )
    assert bad.proc.returncode == 2
    assert bad.proc.stderr.startswith(f"lowbit: config error: reference.run_dir={bf16_reference.run_dir}: ")
    assert "seed" in bad.proc.stderr
    bad = run_lowbit(
        ["+recipe=fp32", f"reference.run_dir={bf16_reference.run_dir}", "model.d_model=64", *ARGS],
        run_dir=tmp_path / "c",
        check=False,
    )
    assert bad.proc.returncode == 2 and "d_model" in bad.proc.stderr
    # same config, other initial weights (e.g. made by other code): found only once the model is
    # built, and still one line, exit 2, no traceback
    import shutil

    import yaml

    forged = tmp_path / "forged_ref"
    shutil.copytree(bf16_reference.run_dir, forged, ignore=shutil.ignore_patterns("wandb", "checkpoints"))
    rc = yaml.safe_load((forged / "run_config.yaml").read_text())
    rc["fingerprints"]["init_weights"] = "0123456789abcdef"
    (forged / "run_config.yaml").write_text(yaml.safe_dump(rc))
    bad = run_lowbit(
        ["+recipe=fp32", f"reference.run_dir={forged}", *ARGS], run_dir=tmp_path / "d", check=False
    )
    assert bad.proc.returncode == 2, bad.proc.stderr[-2000:]
    assert (
        bad.proc.stderr.strip()
        .splitlines()[-1]
        .startswith(f"lowbit: config error: reference.run_dir={forged}: ")
    )
    assert "initial weights" in bad.proc.stderr and "Traceback" not in bad.proc.stderr
