"""The early-warning rule (``train.telemetry.earlywarn``) on hand-made histories, its inducers
(``debug.lr_boost_at_step``, ``debug.inject_outlier_at_step``), and one real induced run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from train.config import RunConfig
from train.engine import lr_lambda, make_scheduler
from train.faults import inject_outlier
from train.telemetry.earlywarn import EarlyWarning, WarningRule

from .conftest import run_lowbit

L = "blocks.0.mlp.fc"


def row(ratio: float = 0.01, kurt: float = 3.0, under: float = 0.05) -> dict:
    return {f"update/{L}/ratio": ratio, f"act/{L}/kurtosis": kurt, f"opt/{L}/exp_avg_sq_underflow_e4m3": under,
            "train/loss": 2.0}  # fmt: skip


def feed(ew: EarlyWarning, rows: list[dict], start: int = 2) -> list[dict]:
    return [ew.update(start + 2 * i, r) for i, r in enumerate(rows)]


def test_quiet_signals_never_warn_and_warmup_is_ignored():
    ew = EarlyWarning(warmup_steps=10)
    # warm-up: the ratio rises 8x with the learning rate, kurtosis wanders: no warning
    out = feed(
        ew,
        [row(ratio=0.001 * (i + 1)) for i in range(5)]
        + [row(ratio=0.008 * (1 - 0.01 * i)) for i in range(20)],
    )
    assert all(o == {"div/warning": 0.0} for o in out) and ew.summary()["div/first_warning_step"] is None


@pytest.mark.parametrize(
    "last, signal",
    [
        (row(ratio=0.02), "update_ratio"),  # 2x the median 0.01 (Marin #1368)
        (row(kurt=12.0), "kurtosis"),  # >= 10 and 4x the median 3
        (row(under=0.16), "moment_underflow_e4m3"),  # 0.05 + 0.11
        (row(ratio=math.nan), "update_ratio"),  # a non-finite signal fires
    ],
)
def test_each_signal_fires_at_its_threshold(last, signal):
    ew = EarlyWarning(warmup_steps=0)
    out = feed(ew, [row() for _ in range(6)] + [last])
    assert out[-1]["div/warning"] == 1.0 and out[-1]["div/warning_signal"].startswith(f"{signal} {L} = ")
    w = ew.summary()["div/warnings"]
    assert [(x["step"], x["signal"], x["layer"]) for x in w] == [(14, signal, L)]
    assert ew.summary()["div/first_warning_step"] == 14


def test_just_below_thresholds_stays_quiet():
    ew = EarlyWarning(warmup_steps=0)
    out = feed(ew, [row() for _ in range(6)] + [row(ratio=0.0199, kurt=9.9, under=0.149)])
    assert out[-1] == {"div/warning": 0.0}
    # kurtosis 40 over a median of 25: above the floor but not 2x its baseline
    ew = EarlyWarning(warmup_steps=0)
    assert feed(ew, [row(kurt=25.0) for _ in range(6)] + [row(kurt=40.0)])[-1] == {"div/warning": 0.0}


def test_needs_history_and_replay_restores_it():
    ew = EarlyWarning(warmup_steps=0, rule=WarningRule(min_history=4))
    assert feed(ew, [row(), row(), row(), row(ratio=1.0)])[-1] == {"div/warning": 0.0}  # 3 values only
    rows = [{"step": 2 + 2 * i, "div/warning": 0.0, **row()} for i in range(6)]
    resumed = EarlyWarning(warmup_steps=0)
    resumed.replay(rows)
    assert resumed.update(14, row(ratio=0.03))["div/warning"] == 1.0


def test_lr_boost_multiplies_the_schedule_from_its_step():
    cfg = RunConfig()
    cfg.trainer.max_steps, cfg.debug.lr_boost_at_step, cfg.debug.lr_boost = 100, 40, 10.0
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, cfg)
    lrs = []
    for _ in range(45):
        lrs.append(opt.param_groups[0]["lr"])  # the lr step len(lrs) applies
        opt.step()
        sched.step()
    plain = [lr_lambda(s, max_steps=100, warmup_frac=cfg.trainer.warmup_frac, min_ratio=cfg.trainer.min_lr_ratio)
             for s in range(45)]  # fmt: skip
    assert lrs[:39] == pytest.approx(plain[:39]) and lrs[39:] == pytest.approx([10 * p for p in plain[39:]])


def test_outlier_grows_one_channel_in_training_forwards_only():
    lin = nn.Linear(4, 2)
    step = [1]
    inject_outlier(lin, layer="", channel=2, growth=2.0, at_step=3, step_of=lambda: step[0])
    seen = []
    lin.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    x = torch.ones(1, 4)
    for s in (1, 3, 5):
        step[0] = s
        lin(x)
    lin.eval()
    lin(x)
    assert [t[0].tolist() for t in seen] == [[1, 1, 1, 1], [1, 1, 2, 1], [1, 1, 8, 1], [1, 1, 1, 1]]


def test_induced_outlier_run_warns_and_summarises(tmp_path):
    """A real run: the outlier inducer at step 20 of 50 makes the kurtosis of the injected layer
    fire; warnings reach metrics.jsonl and summary.json; nothing fires before the inducer."""
    res = run_lowbit(["trainer.max_steps=50", "stats.every=2", "trainer.log_every=1", "trainer.eval_every=50",
                      "stats.families=[act,update,opt]", "debug.inject_outlier_at_step=20", "logger=none"],
                     run_dir=tmp_path)  # fmt: skip
    warned = [r for r in res.metrics if r.get("div/warning")]
    assert warned and all(r["step"] >= 20 for r in warned)
    assert any(r["div/warning_signal"].startswith(f"kurtosis {L} = ") for r in warned)
    summary = json.loads((res.run_dir / "summary.json").read_text())
    assert summary["div/first_warning_step"] == warned[0]["step"]
    assert {w["step"] for w in summary["div/warnings"]} == {r["step"] for r in warned}
