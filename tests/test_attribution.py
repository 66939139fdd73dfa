"""train.review.attribution: exact Shapley shares of the GEMMs recover planted contributions."""

from __future__ import annotations

import random

import pytest

from train.review.attribution import GEMMS, SUBSETS, attribute, render, shapley, subset_name, to_json


def _game(contrib: dict[str, float], inter: float = 0.0):
    """v(S) = sum of the members' contributions (+ ``inter`` when dgrad and wgrad are both in S)."""

    def v(s) -> float:
        return sum(contrib[g] for g in s) + (inter if {"dgrad", "wgrad"} <= set(s) else 0.0)

    return v


def test_subsets_and_names():
    assert len(SUBSETS) == 8 and SUBSETS[0] == () and SUBSETS[-1] == GEMMS
    assert subset_name(()) == "bf16" and subset_name(frozenset({"wgrad", "fwd"})) == "fwd+wgrad"


def test_additive_game_gives_each_player_its_contribution():
    v = _game({"fwd": 0.01, "dgrad": 0.002, "wgrad": 0.03})
    phi = shapley({frozenset(s): v(s) for s in SUBSETS})
    assert phi == pytest.approx({"fwd": 0.01, "dgrad": 0.002, "wgrad": 0.03})


def test_interaction_is_split_evenly_and_shares_add_up():
    v = _game({"fwd": 0.0, "dgrad": 0.0, "wgrad": 0.0}, inter=0.06)  # only dgrad and wgrad together hurt
    phi = shapley({frozenset(s): v(s) for s in SUBSETS})
    assert phi == pytest.approx({"fwd": 0.0, "dgrad": 0.03, "wgrad": 0.03})
    w = _game({"fwd": 0.004, "dgrad": -0.001, "wgrad": 0.02}, inter=0.01)
    phi = shapley({frozenset(s): w(s) for s in SUBSETS})
    assert sum(phi.values()) == pytest.approx(w(GEMMS))  # efficiency


def test_planted_wgrad_effect_is_found_through_seed_noise():
    rng = random.Random(0)
    v = _game({"fwd": 0.0005, "dgrad": 0.0, "wgrad": 0.05})
    gaps = {frozenset(s): {seed: v(s) + rng.gauss(0, 0.002) for seed in range(1, 5)} for s in SUBSETS if s}
    res = attribute(gaps, z=2.0)
    sh = res["shares"]["shapley"]
    assert sh["wgrad"].verdict.kind == "worse" and sh["wgrad"].verdict.mean == pytest.approx(0.05, abs=0.005)
    assert sh["dgrad"].verdict.kind == "indistinguishable"
    lo, hi = sh["wgrad"].interval
    assert lo < 0.05 < hi
    total = sum(s.verdict.mean for s in sh.values())
    assert total == pytest.approx(res["full"].verdict.mean, abs=1e-12)
    assert res["shares"]["only"]["wgrad"].verdict.kind == "worse"
    assert res["shares"]["all_but"]["wgrad"].verdict.kind == "indistinguishable"  # fwd+dgrad: ~0
    assert res["seeds"] == [1, 2, 3, 4] and not res["missing"]
    text = render(res)
    assert "| wgrad | +0.04" in text or "| wgrad | +0.05" in text
    assert "(indistinguishable)" in text and "worse by" in text
    js = to_json(res)
    assert js["shapley"]["wgrad"]["verdict"].startswith("worse") and js["full"]["n"] == 4


def test_unpaired_seeds_are_left_out_and_missing_subsets_named():
    gaps = {frozenset(s): {1: 0.1, 2: 0.1} for s in SUBSETS if s}
    gaps[frozenset({"fwd"})] = {1: 0.1}  # seed 2 lacks one run
    res = attribute(gaps, z=2.0)
    assert res["seeds"] == [1]
    assert res["shares"]["shapley"]["fwd"].verdict.kind == "single_seed"
    del gaps[frozenset({"dgrad"})]
    res = attribute(gaps, z=2.0)
    assert res["seeds"] == [] and res["missing"] == ["dgrad"]
    assert "missing runs: dgrad" in render(res)
