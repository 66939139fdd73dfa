"""Bit-exactness against microxcaling's golden outputs (tests/data/mx_golden, see its README).

Comparison rule (decided here, documented in recipes.mx.quantize, difference (c)):
values are compared as int32 bit patterns with every NaN mapped to one
pattern. microxcaling maps an input -0.0 to +0.0 (``sign(-0) = 0``); lowbit
keeps -0.0. So where the golden value is +0.0 and ours is -0.0 the two are
treated as equal, and the test asserts this is the *only* kind of difference
(both values zero, never the other way round). Elements flagged in a case's
``log2_quirk_mask`` (microxcaling's float32-log2 scale one binade too high,
difference (a)) are excluded and checked against the spec-exact reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recipes.mx import quantize_mx
from recipes.mx.reference import quantize_mx_reference

GOLDEN = Path(__file__).parent / "data" / "mx_golden"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
CASES = MANIFEST["cases"]
ROUNDING = {"nearest": "nearest_away", "even": "nearest_even"}
POS_ZERO, NEG_ZERO = 0, -(2**31)


def canonical_bits(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[t.isnan()] = float("nan")
    return t.view(torch.int32)


def load_case(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.load(GOLDEN / case["input"])
    golden = torch.load(GOLDEN / case["file"])
    return x, golden["output"], golden["log2_quirk_mask"].bool()


def test_manifest_covers_all_formats_and_roundings():
    assert len(CASES) == 28
    assert {c["format"] for c in CASES} == {
        "fp8_e4m3",
        "fp8_e5m2",
        "fp6_e3m2",
        "fp6_e2m3",
        "fp4_e2m1",
        "int8",
    }
    assert {c["rounding"] for c in CASES} == set(ROUNDING)
    for c in CASES:
        assert (GOLDEN / c["file"]).is_file() and c["scale_bits"] == 8


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_golden_bitwise(case: dict):
    x, golden, quirk = load_case(case)
    kw = dict(block_size=case["block_size"], axis=case["axis"], rounding=ROUNDING[case["rounding"]])
    ours = quantize_mx(x, case["format"], scale_rule="floor", **kw)
    assert ours.shape == golden.shape and ours.dtype == golden.dtype == torch.float32

    a, g = canonical_bits(ours), canonical_bits(golden)
    signed_zero = (a == NEG_ZERO) & (g == POS_ZERO)  # difference (c): lowbit keeps -0
    assert not torch.any((a == POS_ZERO) & (g == NEG_ZERO)), "golden -0 where lowbit gives +0"
    a = torch.where(signed_zero, POS_ZERO, a)

    if quirk.any():  # difference (a): ours must be the spec-exact value there
        exact = canonical_bits(quantize_mx_reference(x, case["format"], **kw))
        assert torch.equal(canonical_bits(ours)[quirk], exact[quirk])
    keep = ~quirk
    diff = (a != g) & keep
    assert not diff.any(), f"{int(diff.sum())} elements differ, first at {diff.nonzero()[:3].tolist()}"
    assert torch.equal(golden.isnan(), ours.isnan())


@pytest.mark.parametrize("case", CASES[::5], ids=[c["id"] for c in CASES[::5]])
def test_microxcaling_emulation_reproduces_golden(case: dict):
    """The reference's microxcaling mode (used by the deliberate-difference tests) is faithful."""
    x, golden, _ = load_case(case)
    emulated = quantize_mx_reference(
        x,
        case["format"],
        block_size=case["block_size"],
        axis=case["axis"],
        rounding=ROUNDING[case["rounding"]],
        microxcaling=True,
    )
    assert torch.equal(canonical_bits(emulated), canonical_bits(golden))
