"""train.review.sensitivity: ranking and bisection recover planted per-layer contributions from noisy gaps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from train.review.sensitivity import (
    bounds,
    judge,
    layer_signals,
    max_candidates,
    next_candidate,
    outcome,
    rank_layers,
)
from train.review.series import read_series

LAYERS = [f"blocks.{b}.{m}" for b in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]


def synthetic_signals(contrib: dict[str, float], rng: np.random.Generator) -> dict[str, dict[str, float]]:
    """Signals that grow with a layer's contribution, plus noise; one layer lacks the SQNR signal."""
    out = {}
    for layer, c in contrib.items():
        out[layer] = {
            "weight_drift": 0.05 + 10 * c + rng.normal(0, 0.002),
            "grad_cos": 0.95 - 5 * c + rng.normal(0, 0.002),
        }
        if layer != LAYERS[0]:
            out[layer]["sqnr_db"] = 30 - 500 * c + rng.normal(0, 0.2)
    return out


def search(contrib: dict[str, float], *, target: float, noise: float, seeds: int, z: float = 2.0,
           max_runs: int | None = None, seed: int = 0) -> tuple[dict, list[str], dict]:  # fmt: skip
    """The tool's loop on synthetic gaps: gap(k) = sum of the contributions of the layers not kept + noise."""
    rng = np.random.default_rng(seed)
    ranked = rank_layers(synthetic_signals(contrib, rng))
    evaluated: dict = {}
    runs = 0
    while (k := next_candidate(len(ranked), evaluated, target)) is not None:
        if max_runs is not None and runs >= max_runs:
            break
        if k and evaluated[0].verdict.kind == "indistinguishable":
            break
        true = sum(contrib[x] for x in ranked[k:])
        evaluated[k] = judge(k, list(true + rng.normal(0, noise, seeds)), z=z)
        runs += 1
    return outcome(len(ranked), evaluated, target), ranked, evaluated


def test_planted_layers_are_ranked_first_and_kept():
    contrib = dict.fromkeys(LAYERS, 0.0002) | {"blocks.0.mlp.fc": 0.01, "blocks.1.attn.proj": 0.008}
    res, ranked, evaluated = search(contrib, target=0.003, noise=0.0005, seeds=3)
    assert set(ranked[:2]) == {"blocks.0.mlp.fc", "blocks.1.attn.proj"}
    assert res["status"] == "met" and res["k"] == 2 and res["converged"]
    # bisection over 8 layers: k = 0, then 4, 2, 1 (1 fails: one planted layer is still quantized)
    assert sorted(evaluated) == [0, 1, 2, 4] and len(evaluated) - 1 <= max_candidates(8)
    assert not evaluated[1].meets(0.003) and evaluated[2].meets(0.003)


def test_recipe_that_already_meets_the_target_keeps_nothing():
    res, _, evaluated = search(dict.fromkeys(LAYERS, 0.0001), target=0.005, noise=0.0002, seeds=3)
    assert res == {"status": "met", "k": 0, "converged": True} and list(evaluated) == [0]


def test_gap_spread_over_every_layer_needs_all_of_them():
    # each layer costs 0.002: even 7 kept leave 0.002 > target 0.001; only the BF16 run (k = 8) meets it
    res, _, evaluated = search(dict.fromkeys(LAYERS, 0.002), target=0.001, noise=0.0001, seeds=3)
    assert res["status"] == "all_layers" and res["k"] == 8 and 8 not in evaluated and 7 in evaluated


def test_noise_larger_than_the_effect_is_not_separable():
    res, _, evaluated = search(dict.fromkeys(LAYERS, 0.0), target=0.0005, noise=0.003, seeds=3, seed=3)
    assert evaluated[0].verdict.kind == "indistinguishable" and not evaluated[0].meets(0.0005)
    assert res["status"] == "not_separable" and list(evaluated) == [0]


def test_budget_ends_the_search_before_an_answer():
    contrib = dict.fromkeys(LAYERS, 0.0002) | {"blocks.0.mlp.fc": 0.01, "blocks.1.attn.proj": 0.008}
    res, _, evaluated = search(contrib, target=0.003, noise=0.0005, seeds=3, max_runs=1)
    assert list(evaluated) == [0] and res["status"] == "budget" and res["k"] == 0
    res, _, evaluated = search(contrib, target=0.0001, noise=0.00002, seeds=3, max_runs=3)
    assert res["status"] == "budget" and not any(g.meets(0.0001) for g in evaluated.values())


def test_bounds_with_a_non_monotone_gap():
    g = lambda k, d: judge(k, d, z=2.0)  # noqa: E731
    ev = {0: g(0, [0.01, 0.011]), 2: g(2, [0.001, 0.0012]), 3: g(3, [0.01, 0.011]), 5: g(5, [0.0, 0.0001])}
    # the smallest meeting k is 2; 3 failing above it does not move hi, 0 is the largest failing below it
    assert bounds(8, ev, 0.005) == (0, 2) and next_candidate(8, ev, 0.005) == 1
    assert next_candidate(8, {}, 0.005) == 0 and bounds(8, {0: ev[0]}, 0.005) == (0, 8)
    assert max_candidates(8) == 3 and max_candidates(9) == 4 and max_candidates(1) == 1


def test_layer_signals_read_from_metrics_rows(tmp_path):
    rows = []
    for step, drift, cos in ((5, 0.1, 0.9), (10, 0.2, 0.7)):
        rows.append({"step": step, "train/loss": 4.0, "div/weight_drift/a.fc": drift, "div/grad_cos/a.fc": cos,
                     "gemm/a.fc/fwd/sqnr_db": 20.0, "gemm/a.fc/wgrad/sqnr_db": 12.0 + step,
                     "div/weight_drift/b.fc": drift / 2, "gemm/b.fc/fwd/sqnr_db": 25.0})  # fmt: skip
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sig = layer_signals([read_series(path)], ["a.fc", "b.fc", "c.fc"])
    # drift: the last stat step; cosine: the mean; SQNR: the lowest GEMM's mean over stat steps
    assert sig["a.fc"] == pytest.approx({"weight_drift": 0.2, "grad_cos": 0.8, "sqnr_db": 19.5})
    assert sig["b.fc"] == pytest.approx({"weight_drift": 0.1, "sqnr_db": 25.0}) and sig["c.fc"] == {}
    assert rank_layers(sig) == ["a.fc", "b.fc", "c.fc"]


def test_sqnr_class_ranks_before_lock_step_signals():
    sig = {
        "a": {"weight_drift": 0.30, "grad_cos": 0.70, "sqnr_db": 44.0},  # drifts most, quantized finely
        "b": {"weight_drift": 0.05, "grad_cos": 0.95, "sqnr_db": 17.0},  # the coarse layer
        "c": {"weight_drift": 0.20, "grad_cos": 0.90, "sqnr_db": 45.0},
        "d": {"weight_drift": 0.90, "grad_cos": 0.10},  # no quantized GEMM output: last
    }
    assert rank_layers(sig) == ["b", "a", "c", "d"]
    assert rank_layers(sig, "weight_drift") == ["d", "a", "c", "b"]
    assert rank_layers(sig, "sqnr_db") == ["b", "a", "c", "d"] and rank_layers(sig, "grad_cos")[0] == "d"
