"""The report's pure parts: the verdict rule on synthetic deltas with known mean and noise (every
verdict), the per-seed delta, and the columnar metrics reader on every kind of file it meets."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from train.review.series import read_series
from train.review.verdict import decide, first_nonfinite_step, seed_delta


def test_indistinguishable_when_the_mean_is_inside_z_standard_errors():
    rng = np.random.default_rng(0)
    d = 0.001 + 0.01 * rng.standard_normal(5)  # true gap 0.001, noise 0.01: cannot be told apart
    mean, se = d.mean(), d.std(ddof=1) / math.sqrt(5)
    assert abs(mean) < 2 * se
    v = decide(list(d), z=2.0, states=["completed"] * 5)
    assert v.kind == "indistinguishable" and v.n == 5
    assert v.mean == pytest.approx(mean) and v.se == pytest.approx(se)


def test_worse_and_better_with_sigma():
    d = [0.050, 0.052, 0.048]  # mean 0.05, sample std 0.002, SE 0.002/sqrt(3)
    v = decide(d, z=2.0)
    se = 0.002 / math.sqrt(3)
    assert v.kind == "worse" and v.se == pytest.approx(se)
    assert v.text == f"worse by 0.0500 ({0.05 / se:.1f} sigma)"
    b = decide([-x for x in d], z=2.0)
    assert b.kind == "better" and b.text.startswith("better by 0.0500 (")
    # the same gap inside a larger z is indistinguishable: z is the only threshold
    assert decide(d, z=0.05 / se + 0.1).kind == "indistinguishable"


def test_zero_noise_and_exact_zero():
    assert decide([0.0, 0.0, 0.0], z=2).kind == "indistinguishable"  # bit-identical to the reference
    v = decide([0.01, 0.01], z=2)
    assert v.kind == "worse" and "inf sigma" in v.text


def test_states_come_before_statistics():
    d = [0.05, 0.05, 0.05]
    assert decide(d, z=2, is_reference=True).text == "reference"
    assert decide(d, z=2, diverged_at=[40, 12]).text == "diverged at step 12"
    assert decide(d, z=2, states=["completed", "nonfinite"]).kind == "diverged"
    assert decide(d, z=2, states=["completed", "failed", "completed"]).text == "failed (1 of 3 seeds)"
    assert decide(d, z=2, states=["completed", "config_error"]).kind == "failed"
    assert decide(d, z=2, states=["completed", "missing"]).kind == "failed"
    assert decide(d, z=2, states=["completed", "running"]).text == "in progress"
    assert decide(d, z=2, states=["preempted"]).text == "in progress"
    assert decide([0.3], z=2).text == "single seed: no verdict"
    assert decide([0.3], z=2).mean == pytest.approx(0.3)
    assert decide([], z=2).text == "no reference"


def test_seed_delta_uses_the_last_k_common_steps():
    steps = np.array([2, 4, 6, 8, 10])
    loss = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    ref_steps = np.array([2, 4, 6, 8])  # the reference stopped earlier: only common steps count
    ref = np.array([4.0, 3.5, 2.5, 1.0])
    assert seed_delta(steps, loss, ref_steps, ref, k=2) == pytest.approx((3 + 2) / 2 - (2.5 + 1) / 2)
    assert seed_delta(steps, loss, np.array([1, 3]), np.array([1.0, 1.0]), k=2) is None
    assert first_nonfinite_step(steps, np.array([1.0, 2, math.nan, 1, math.inf])) == 6
    assert first_nonfinite_step(steps, loss) is None


def test_reader_restores_nonfinite_and_keeps_absent_apart_from_nan(tmp_path):
    rows = [
        json.dumps({"step": 1, "train/loss": 3.0, "perf/tokens_per_s": 100}),
        json.dumps({"step": 2, "train/loss": None, "train/loss/nonfinite": "nan", "grad/a/sqnr_db": 10.5}),
        '{"step": 3, "train/loss": Infinity, "note": "text", "hist": [1, 2]}',  # older files: bare token
        '{"step": 4, "train/loss": -Infinity, "grad/a/sqnr_db": NaN}',
        '{"step": 5, "train/loss": 2.5, "perf/tokens_per_s": 1',  # torn last line: dropped
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(rows))
    s = read_series(path)
    assert s.steps.tolist() == [1, 2, 3, 4]
    _, loss = s.get("train/loss")
    assert loss[0] == 3.0 and math.isnan(loss[1]) and loss[2] == math.inf and loss[3] == -math.inf
    steps, sq = s.get("grad/a/sqnr_db")  # absent at steps 1 and 3; a logged NaN at step 4
    assert steps.tolist() == [2, 4] and sq[0] == 10.5 and math.isnan(sq[1])
    assert s.get("perf/tokens_per_s")[0].tolist() == [1]
    assert "note" not in s.keys() and "train/loss/nonfinite" not in s.keys()
    assert s.get("missing")[0].size == 0 and "missing" not in s
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"step": 1, "train/lo')
    assert read_series(empty).steps.size == 0 and read_series(tmp_path / "nope.jsonl").steps.size == 0
