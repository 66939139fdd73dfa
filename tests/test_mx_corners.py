"""Hand-made MX corner cases with known exact answers, the deliberate differences (a)-(c)
from microxcaling, stochastic rounding, and hypothesis properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from recipes.mx import FORMATS, element_values, encode_mx, quantize_mx
from recipes.mx.core import _round_integer
from recipes.mx.reference import quantize_mx_reference

FLT_MAX = float(torch.finfo(torch.float32).max)
NEG_ZERO = -(2**31)


def block(*values: float, size: int = 32) -> torch.Tensor:
    """One block (1, size) starting with ``values``, zero elsewhere."""
    x = torch.zeros(1, size)
    x[0, : len(values)] = torch.tensor(values, dtype=torch.float64).float()
    return x


def q(x: torch.Tensor, fmt: str, **kw) -> list[float]:
    return quantize_mx(x, fmt, **kw)[0].tolist()


# ---------------------------------------------------------------- zeros, max, saturation, huge


def test_zeros_and_signed_zeros():
    x = block(0.0, -0.0)
    for fmt in FORMATS:
        y = quantize_mx(x, fmt)
        assert torch.all(y == 0)
        assert y[0, 1].view(torch.int32).item() == NEG_ZERO  # -0 kept (difference (c))
        assert y[0, 0].view(torch.int32).item() == 0
        assert encode_mx(x, fmt).scales_e8m0.item() == 0  # all-zero block: X = 2^-127


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_exact_max_is_kept_and_larger_values_saturate(fmt: str):
    m = FORMATS[fmt].max_norm
    assert q(block(m, -m, 1.0), fmt)[:3] == [m, -m, 1.0]
    # amax just below 2^(emax+1): X = 1 and the value clamps to max_norm (never Inf)
    top = (2.0 ** (FORMATS[fmt].emax + 1)) * (1 - 2.0**-24)  # largest float32 below the power of two
    assert q(block(top, -top), fmt)[:2] == [m, -m]


def test_saturation_examples():
    assert q(block(500.0, -511.0, 464.0), "fp8_e4m3")[:3] == [448.0, -448.0, 448.0]
    assert q(block(65535.0), "fp8_e5m2")[0] == 57344.0
    assert q(block(7.9, 6.9), "fp4_e2m1")[:2] == [6.0, 6.0]
    assert q(block(31.0), "fp6_e3m2")[0] == 28.0
    assert q(block(7.99), "fp6_e2m3")[0] == 7.5
    assert q(block(1.999), "int8")[0] == 127 / 64


def test_huge_values_stay_finite():
    # 1e38: floor(log2) = 126, X = 2^118, 1e38 / 2^118 = 300.9 -> e4m3 288 (quantum 32)
    assert q(block(1e38), "fp8_e4m3")[0] == 288.0 * 2.0**118
    expected = {
        "fp8_e4m3": 448 * 2.0**119,
        "fp8_e5m2": 57344 * 2.0**112,
        "fp6_e3m2": 28 * 2.0**123,
        "fp6_e2m3": 7.5 * 2.0**125,
        "fp4_e2m1": 6 * 2.0**125,
        "int8": 127 / 64 * 2.0**127,
    }
    for fmt, value in expected.items():
        y = q(block(FLT_MAX, -FLT_MAX, 1.0), fmt)
        assert y[:2] == [value, -value], fmt
        assert y[2] == 0.0


def test_fp32_subnormals():
    # tiny block: se clamps to -127, v = x * 2^127
    assert q(block(3 * 2.0**-135, 2.0**-149), "fp8_e4m3")[:2] == [3 * 2.0**-135, 0.0]
    assert q(block(3 * 2.0**-135), "int8")[0] == 2.0**-133  # v = 3/256 -> 0.75 quanta -> 1 quantum
    assert q(block(2.0**-127, 2.0**-128), "fp4_e2m1")[:2] == [2.0**-127, 2.0**-128]
    # subnormal next to a normal amax: far below the smallest element -> 0
    assert q(block(1.0, 1e-40, -1e-40), "fp8_e5m2")[:3] == [1.0, 0.0, 0.0]


# ---------------------------------------------------------------- NaN / Inf


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_makes_the_whole_block_nan(bad: float):
    x = torch.ones(2, 64)
    x[0, 40] = bad
    for fmt in FORMATS:
        y = quantize_mx(x, fmt)
        assert y[0, 32:].isnan().all() and not y[0, :32].isnan().any()
        assert torch.all(y[1] == 1.0)
        s = encode_mx(x, fmt).scales_e8m0
        assert s[0, 1].item() == 0xFF and s[0, 0].item() != 0xFF


# ---------------------------------------------------------------- ties and the rounding modes

FP4_TIES = (4.0, 2.5, 5.0, 0.25, 1.25, 1.75, -2.5, -5.0, -0.25, -1.75)


@pytest.mark.parametrize(
    "rounding,expected",
    [
        ("nearest_even", [4.0, 2.0, 4.0, 0.0, 1.0, 2.0, -2.0, -4.0, -0.0, -2.0]),
        ("nearest_away", [4.0, 3.0, 6.0, 0.5, 1.5, 2.0, -3.0, -6.0, -0.5, -2.0]),
        ("toward_zero", [4.0, 2.0, 4.0, 0.0, 1.0, 1.5, -2.0, -4.0, -0.0, -1.5]),
    ],
)
def test_fp4_exact_ties(rounding: str, expected: list[float]):
    assert q(block(*FP4_TIES), "fp4_e2m1", rounding=rounding)[: len(expected)] == expected


def test_fp8_and_int8_ties():
    e4m3 = (256.0, 1.0625, 2.0**-10, 3 * 2.0**-10, -(2.0**-10))  # X = 1
    assert q(block(*e4m3), "fp8_e4m3")[:5] == [256.0, 1.0, 0.0, 2.0**-8, -0.0]
    assert q(block(*e4m3), "fp8_e4m3", rounding="nearest_away")[:5] == [
        256.0,
        1.125,
        2.0**-9,
        2.0**-8,
        -(2.0**-9),
    ]
    int8 = (1.0, 1 / 128, 3 / 128, -1 / 128)  # X = 1, quantum 1/64
    assert q(block(*int8), "int8")[:4] == [1.0, 0.0, 2 / 64, -0.0]
    assert q(block(*int8), "int8", rounding="nearest_away")[:4] == [1.0, 1 / 64, 2 / 64, -1 / 64]


def test_toward_zero():
    assert q(block(300.0, -300.0, 1.99, -0.001), "fp8_e4m3", rounding="toward_zero")[:4] == [
        288.0,
        -288.0,
        1.875,
        -0.0,
    ]


def test_half_away_trick_is_exact():
    """floor(|t| + (0.5 - 2^-25)) is exact round-half-away: every float32 near k/2, k < 1024, and random ones."""
    centers = torch.arange(1, 1024, dtype=torch.float32) / 2
    offsets = torch.arange(-6, 7, dtype=torch.int32)
    near = (centers.view(torch.int32)[:, None] + offsets).view(torch.float32).flatten()
    rand = torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * torch.exp2(
        torch.randint(-30, 9, (100_000,)).float()
    )
    t = torch.cat([near, rand, torch.tensor([0.5 - 2**-25, 2**-149, 0.0])])
    t = torch.cat([t, -t])
    ours = _round_integer(t.clone(), rounding="nearest_away", sign_of=t, noise=None)
    exact = torch.copysign(torch.floor(t.double().abs() + 0.5), t.double()).float()
    assert torch.equal(ours.view(torch.int32), exact.view(torch.int32))


# ---------------------------------------------------------------- padding, 3-D, int8 symmetry


def test_padded_last_block():
    x = torch.cat([torch.ones(1, 32), torch.tensor([[7.0, 1.0, 0.3, -0.74, 0.0, 2.2, 3.0, -5.0]])], dim=1)
    y = quantize_mx(x, "fp4_e2m1")  # 40 = 32 + 8 real elements in a zero-padded block
    assert y[0, :32].tolist() == [1.0] * 32
    assert y[0, 32:].tolist() == [6.0, 1.0, 0.5, -0.5, 0.0, 2.0, 3.0, -4.0]
    assert torch.equal(y[:, 32:], quantize_mx(x[:, 32:], "fp4_e2m1", block_size=8))


def test_3d_blocks_along_axis_1():
    x = torch.full((2, 64, 3), 0.3)
    x[0, 5, 0] = 6.0  # amax of block (b=0, rows 0..31, col 0): X = 1 -> 0.3 -> 0.5 (quantum 0.5)
    x[1, 40, 2] = 0.7  # block (b=1, rows 32..63, col 2): X = 2^-3 -> 0.3/X = 2.4 -> 2
    y = quantize_mx(x, "fp4_e2m1", axis=1)
    assert y[0, 5, 0] == 6.0 and torch.all(y[0, :32, 0][torch.arange(32) != 5] == 0.5)
    assert y[1, 40, 2] == 0.75 and y[1, 41, 2] == 0.25
    # every other block is all 0.3: X = 2^-4, 0.3 * 16 = 4.8 -> 4 -> 0.25
    assert y[0, 32:, 0].eq(0.25).all() and y[:, :, 1].eq(0.25).all()
    assert torch.equal(y, quantize_mx(x.transpose(1, 2), "fp4_e2m1").transpose(1, 2))


def test_int8_is_symmetric():
    x = block(-1.9999999, 1.0, -1.9921875, -1.99)
    assert q(x, "int8")[:4] == [-127 / 64, 1.0, -127 / 64, -127 / 64]
    assert int((encode_mx(torch.randn(64, 64) * 3, "int8").codes == 0x80).sum()) == 0


# ---------------------------------------------------------------- stochastic rounding


def test_stochastic_is_unbiased_on_a_constant():
    for c in (1.3, -1.3):
        x = torch.full((2000, 32), c)  # fp4: X = 0.25, v = 5.2 -> 4 or 6 -> 1.0 or 1.5
        y = quantize_mx(x, "fp4_e2m1", rounding="stochastic", seed=1)
        assert set(y.abs().unique().tolist()) == {1.0, 1.5}
        assert abs(y.mean().item() - c) < 0.005  # sd of the mean ~0.001


def test_stochastic_is_deterministic_given_the_seed():
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    a = quantize_mx(x, "fp6_e2m3", rounding="stochastic", seed=3)
    b = quantize_mx(x, "fp6_e2m3", rounding="stochastic", generator=torch.Generator().manual_seed(3))
    c = quantize_mx(x, "fp6_e2m3", rounding="stochastic", seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("fmt", ["fp8_e5m2", "fp6_e3m2", "fp4_e2m1"])
def test_stochastic_only_gives_the_two_neighbours(fmt: str):
    """Sign-magnitude codes: the stochastic code is the truncated one or the next one up in magnitude."""
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    sign = FORMATS[fmt].sign_bit
    down = encode_mx(x, fmt, rounding="toward_zero")
    on_grid = quantize_mx(x, fmt, rounding="toward_zero") == x
    for seed in range(3):
        sr = encode_mx(x, fmt, rounding="stochastic", seed=seed)
        assert torch.equal(sr.scales_e8m0, down.scales_e8m0)
        step = (sr.codes & ~sign).int() - (down.codes & ~sign).int()
        assert torch.all((step == 0) | (step == 1)) and torch.all(step[on_grid] == 0)
        assert torch.equal(sr.codes & sign, down.codes & sign)


# ---------------------------------------------------------------- deliberate differences from microxcaling


def test_difference_a_exact_shared_exponent():
    amax = 64 * (1 - 2.0**-24)  # floor(log2) = 5, but float32 log2 rounds to 6.0
    assert torch.log2(torch.tensor(amax)).item() == 6.0
    x = block(amax)
    mx = quantize_mx_reference(x, "fp8_e4m3", microxcaling=True)[0, 0].item()
    assert mx == 64.0  # X = 2^(6-8): v = 256(1-2^-24) rounds to 256
    assert q(x, "fp8_e4m3")[0] == 56.0  # X = 2^(5-8): v = 512(1-2^-24) saturates to 448
    # at FLT_MAX microxcaling overflows: +Inf for e4m3, an all-NaN block for int8
    big = block(FLT_MAX, 1.0)
    assert quantize_mx_reference(big, "fp8_e4m3", microxcaling=True)[0, 0].item() == math.inf
    assert quantize_mx_reference(big, "int8", microxcaling=True).isnan().all()
    assert (
        torch.isfinite(quantize_mx(big, "fp8_e4m3")).all() and torch.isfinite(quantize_mx(big, "int8")).all()
    )


@pytest.mark.parametrize("rounding", ["nearest_away", "nearest_even"])
def test_difference_b_no_double_rounding(rounding: str):
    t = 0.5 - 2.0**-25  # quanta; fp6_e2m3 with X = 1 has quantum 1/8 below 1
    x = block(4.0, t / 8, -t / 8)
    mx = quantize_mx_reference(x, "fp6_e2m3", rounding=rounding, microxcaling=True)[0, 1:3].tolist()
    assert mx == [0.125, -0.125]
    assert q(x, "fp6_e2m3", rounding=rounding)[1:3] == [0.0, -0.0]


def test_difference_c_negative_zero_kept():
    x = block(-0.0, -1e-6, 1.0)  # -1e-6 / 2^-8 is below half of e4m3's 2^-9
    ours = quantize_mx(x, "fp8_e4m3")[0].view(torch.int32)
    mx = quantize_mx_reference(x, "fp8_e4m3", microxcaling=True)[0].view(torch.int32)
    assert ours[0].item() == NEG_ZERO and mx[0].item() == 0  # input -0: microxcaling +0
    assert ours[1].item() == NEG_ZERO and mx[1].item() == NEG_ZERO  # rounds to zero: both -0


# ---------------------------------------------------------------- properties

FINITE_F32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(
    x=arrays(dtype="float32", shape=st.tuples(st.integers(1, 3), st.integers(1, 70)), elements=FINITE_F32),
    fmt=st.sampled_from(list(FORMATS)),
    rounding=st.sampled_from(["nearest_even", "nearest_away", "toward_zero", "stochastic"]),
)
def test_output_is_on_the_grid_times_the_block_scale(x, fmt: str, rounding: str):
    x = torch.from_numpy(x.copy())
    y = quantize_mx(x, fmt, rounding=rounding, seed=0)
    grid = set(element_values(fmt)[torch.isfinite(element_values(fmt))].tolist())
    f = FORMATS[fmt]
    for row in range(x.shape[0]):
        for start in range(0, x.shape[1], 32):
            xs, ys = x[row, start : start + 32], y[row, start : start + 32]
            amax = xs.abs().max().item()
            e = math.frexp(amax)[1] - 1 if amax > 0 else -127  # exact floor(log2 amax)
            scale = 2.0 ** max(e - f.emax, -127)
            assert all(v / scale in grid for v in ys.tolist())
            assert ys.abs().max().item() <= f.max_norm * scale
            assert torch.all(torch.sign(ys) * torch.sign(xs) >= 0)


@settings(max_examples=40, deadline=None)
@given(
    x=arrays(dtype="float32", shape=st.integers(1, 100), elements=FINITE_F32),
    fmt=st.sampled_from(list(FORMATS)),
)
def test_quantize_is_idempotent_and_matches_the_reference(x, fmt: str):
    x = torch.from_numpy(x.copy())
    y = quantize_mx(x, fmt)
    assert torch.equal(quantize_mx(y, fmt).view(torch.int32), y.view(torch.int32))
    assert torch.equal(quantize_mx_reference(x, fmt).view(torch.int32), y.view(torch.int32))
