"""recipes.numerics on hand-built tensors with exact, hand-counted answers, plus edge cases."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recipes.fp8 import quantize_fp8_current
from recipes.mx import quantize_mx, quantize_nvfp4
from recipes.numerics import (
    FORMAT_SPECS,
    REDUCE_OPS,
    FormatSpec,
    get_spec,
    overflow_fraction,
    quantize_like,
    relative_error,
    sqnr_db,
    stats_from_sums,
    tensor_stats,
    tensor_sums,
    underflow_fraction,
    zero_fraction,
)

BASE_KEYS = {"norm", "absmax", "zero_frac", "nonfinite_frac"}
SPEC_KEYS = BASE_KEYS | {"underflow_frac", "overflow_frac", "sqnr_db", "rel_error"}


def t(*values: float) -> torch.Tensor:
    """float32 tensor from values given exactly (float64 literals rounded once)."""
    return torch.tensor(values, dtype=torch.float64).float()


def val(x: torch.Tensor) -> float:
    assert x.dim() == 0
    return x.item()


def f32(a: float) -> float:
    """The float32 value nearest ``a`` (fractions are returned in float32)."""
    return torch.tensor(a, dtype=torch.float32).item()


# ---------------------------------------------------------------- specs


def test_every_name_resolves_and_unknown_names_are_refused():
    for name in ("mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1", "mxint8"):
        s = get_spec(name)
        assert (s.family, s.block_size, s.scale_rule) == ("mx", 32, "floor")
    assert get_spec("nvfp4").block_size == 16
    assert get_spec("fp8_e4m3").family == get_spec("fp8_e5m2").family == "fp8"
    assert {get_spec(n).family for n in ("bf16", "fp16", "fp32")} == {"cast"}
    spec = get_spec("mxfp4_e2m1")
    assert get_spec(spec) is spec
    with pytest.raises(ValueError, match="mxfp4_e2m1"):  # the message lists the valid names
        get_spec("fp4")
    with pytest.raises(ValueError, match="scale_rule"):
        dataclasses.replace(spec, scale_rule="round")
    with pytest.raises(ValueError, match="family"):
        FormatSpec("x", "int4", "int4")


@pytest.mark.parametrize("name", list(FORMAT_SPECS))
def test_quantize_like_is_the_library_quantizer(name: str):
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)) * 3
    s = get_spec(name)
    if s.family == "mx":
        ref = quantize_mx(x, s.elem, axis=0)
    elif s.family == "nvfp4":
        ref = quantize_nvfp4(x, axis=0)
    elif s.family == "fp8":
        ref = quantize_fp8_current(x, s.elem)
    else:
        ref = x.to(getattr(torch, s.elem)).float()
    got = quantize_like(x, name, axis=0)
    assert got.dtype == x.dtype and torch.equal(got, ref)


# ---------------------------------------------------------------- zeros, sqnr, relative error


def test_zero_fraction_counts_both_signed_zeros_over_all_elements():
    x = t(0.0, -0.0, 1.0, math.nan, math.inf, 2.0, 0.0, 3.0)
    assert val(zero_fraction(x)) == f32(3 / 8)
    assert val(zero_fraction(torch.empty(0))) == 0.0
    assert val(tensor_stats(x)["zero_frac"]) == f32(3 / 8)


def test_sqnr_and_relative_error_on_a_hand_computed_pair():
    x, q = t(3.0, 4.0), t(3.0, 3.0)  # signal 25, noise 1
    assert val(sqnr_db(x, q)) == pytest.approx(10 * math.log10(25.0), rel=1e-6)
    assert val(relative_error(x, q)) == pytest.approx(0.2, rel=1e-6)
    assert val(sqnr_db(x, x)) == math.inf and val(relative_error(x, x)) == 0.0
    zero = torch.zeros(4)
    assert val(sqnr_db(zero, zero)) == math.inf and val(relative_error(zero, zero)) == 0.0
    assert val(sqnr_db(zero, t(0, 0, 0, 1))) == -math.inf
    assert val(relative_error(zero, t(0, 0, 0, 1))) == math.inf


def test_sqnr_of_tiny_values_does_not_vanish_in_float32_squares():
    # x^2 ~ 2^-260 is zero in float32; the float64 sums keep the ratio exact.
    x, q = t(3 * 2.0**-130, 4 * 2.0**-130), t(3 * 2.0**-130, 3 * 2.0**-130)
    assert val(sqnr_db(x, q)) == pytest.approx(10 * math.log10(25.0), rel=1e-6)


# ---------------------------------------------------------------- MX fp4_e2m1


def mx_fp4_block() -> tuple[torch.Tensor, int, int]:
    """One 32-element block, amax 6 * 2^-3: floor scale X = 2^(2 - 2 - 3) = 2^-3.

    Elements v = x / X on the E2M1 grid {0, 0.5, 1, ...}: v < 0.25 rounds to 0,
    v = 0.25 is a tie that goes to the even neighbour 0, v in (0.25, 0.5) to 0.5.
    """
    X = 2.0**-3
    values = (
        [6 * X]
        + [0.125 * X] * 5  # underflow
        + [-0.25 * X] * 3  # tie -> -0: underflow
        + [0.375 * X] * 4  # -> 0.5 X: kept
        + [1.0 * X] * 9  # kept
        + [0.0] * 10  # exact zeros: not counted
    )
    assert len(values) == 32
    return t(*values), 8, 22


def test_mxfp4_underflow_is_counted_by_hand():
    x, num_under, num_nonzero = mx_fp4_block()
    q = quantize_like(x, "mxfp4_e2m1")
    assert q[1:6].eq(0).all() and q[6:9].eq(0).all() and q[9:13].eq(0.5 * 2.0**-3).all()
    assert val(underflow_fraction(x, "mxfp4_e2m1")) == f32(num_under / num_nonzero)  # 8 / 22
    s = tensor_sums(x, "mxfp4_e2m1")
    assert (s["num_underflow"].item(), s["num_nonzero"].item(), s["num_zero"].item()) == (8, 22, 10)
    assert val(tensor_stats(x, "mxfp4_e2m1")["zero_frac"]) == f32(10 / 32)


def test_mx_blocks_follow_the_axis():
    x, num_under, num_nonzero = mx_fp4_block()
    x2 = torch.stack([x, x * 2.0**10])  # (2, 32): two blocks along the last axis, scales 2^-3, 2^7
    assert val(underflow_fraction(x2, "mxfp4_e2m1")) == f32(num_under / num_nonzero)
    assert val(underflow_fraction(x2.T.contiguous(), "mxfp4_e2m1", axis=0)) == f32(8 / 22)
    # blocks along axis 0 pair x[i] with 1024 x[i]: X = 2^(floor(log2 1024|x_i|) - 2), so
    # x[i] / X is in [4/1024, 8/1024) < 0.25 and underflows: the 22 small ones of 44 non-zeros
    assert val(underflow_fraction(x2, "mxfp4_e2m1", axis=0)) == 0.5


def test_mxfp4_overflow_counts_ieee_overflow_not_every_clamped_value():
    # floor scale: amax 7.5 * 2^4 -> X = 2^(6 - 2) = 2^4. On the fp4 grid the step
    # above 4 is 2: v = 6.5 clamps to 6 but would round to 6 anyway (not counted);
    # v = 7 is a tie that rounds to 8 (odd index 3 -> up): overflow; 7.5 too.
    X = 2.0**4
    x = t(*([7.5 * X, 7.0 * X, -6.5 * X, 6.0 * X, 1.0 * X] + [0.5 * X] * 27))
    q = quantize_like(x, "mxfp4_e2m1")
    assert q[:4].tolist() == [6 * X, 6 * X, -6 * X, 6 * X]
    assert val(overflow_fraction(x, "mxfp4_e2m1")) == f32(2 / 32)
    assert val(tensor_stats(x, "mxfp4_e2m1")["overflow_frac"]) == f32(2 / 32)
    # the rceil rule scales amax below max_norm: nothing overflows by construction
    rceil = dataclasses.replace(get_spec("mxfp4_e2m1"), scale_rule="rceil")
    assert val(overflow_fraction(x, rceil)) == 0.0


def test_mxfp8_e4m3_overflow_threshold_is_exclusive_at_464():
    # 448 = index 14 * 32 is even: the tie v = 464 rounds down to 448, 464 + ulp overflows.
    X = 1.0  # amax in [256, 512) -> X = 2^(8 - 8)
    above = 464 * (1 + 2.0**-23)
    x = t(*([464.0, above, 500.0, 448.0, 300.0] + [1.0] * 27))
    assert val(overflow_fraction(x * X, "mxfp8_e4m3")) == f32(2 / 32)


# ---------------------------------------------------------------- casts


def test_fp16_cast_overflow_counts_values_that_become_inf():
    # 65519 rounds to 65504 (max); 65520 is the tie that RNE sends to 2^16 -> Inf.
    x = t(65504.0, 65519.0, 65520.0, 1e5, -7e4, 1.0, 0.0, math.inf, math.nan)
    assert val(overflow_fraction(x, "fp16")) == f32(3 / 7)  # finite elements: 7
    st_ = tensor_stats(x, "fp16")
    assert val(st_["overflow_frac"]) == f32(3 / 7)
    assert val(st_["nonfinite_frac"]) == f32(2 / 9)
    assert val(st_["sqnr_db"]) == -math.inf  # finite x -> Inf: infinite error
    assert val(st_["absmax"]) == 1e5 and val(st_["underflow_frac"]) == 0.0


def test_bf16_underflow_below_half_the_smallest_subnormal():
    # bf16's smallest subnormal is 2^-133: 2^-134 is the tie -> 0, 1.5 * 2^-134 -> 2^-133.
    x = t(2.0**-133, 2.0**-134, -(2.0**-135), 1.5 * 2.0**-134, 2.0**-140, 1.0, 0.0)
    assert quantize_like(x, "bf16").tolist()[:4] == [2.0**-133, 0.0, -0.0, 2.0**-133]
    assert val(underflow_fraction(x, "bf16")) == f32(3 / 6)
    assert val(overflow_fraction(x, "bf16")) == 0.0


# ---------------------------------------------------------------- FP8 per-tensor current scaling


def test_fp8_e4m3_current_scaling_underflow_after_scaling():
    # amax 448 -> scale 1: E4M3's smallest subnormal 2^-9, tie at 2^-10 -> 0.
    x = t(2.0**-9, 2.0**-10, 2.0**-11, 1.5 * 2.0**-10, 448.0, 1.0)
    assert val(underflow_fraction(x, "fp8_e4m3")) == f32(2 / 6)
    # amax 896 -> scale 1/2: 2^-9 now scales to the tie 2^-10 and 1.5 * 2^-10 to
    # 0.75 * 2^-10, below it: both underflow too (1.0 scales to 0.5, a normal)
    x2 = torch.cat([x[:4], t(896.0, 1.0)])
    assert val(underflow_fraction(x2, "fp8_e4m3")) == f32(4 / 6)
    assert val(overflow_fraction(x, "fp8_e4m3")) == 0.0  # current scaling: 0 by construction


def test_fp8_overflow_when_the_scale_falls_back_to_one():
    # an Inf amax keeps scale 1.0 (TE); finite values then overflow as in an unscaled cast.
    x = t(math.inf, 1000.0, 464.0, 1.0)  # e4m3: 1000 > 464; 464 is the tie that rounds to 448
    assert val(overflow_fraction(x, "fp8_e4m3")) == f32(1 / 3)
    # e5m2: 57344 = index 7 * 8192 is odd, so the tie 61440 overflows; torch's e5m2 cast agrees
    y = t(math.inf, 61439.0, 61440.0, 61441.0, 57344.0)
    assert val(overflow_fraction(y, "fp8_e5m2")) == f32(2 / 4)
    assert torch.isinf(y[1:].to(torch.float8_e5m2).float()).sum().item() == 2


@pytest.mark.parametrize("name", [n for n in FORMAT_SPECS if n != "fp32"])
def test_every_format_overflows_nothing_on_ordinary_data_with_its_own_amax_block(name: str):
    x = torch.linspace(-1, 1, 64).reshape(2, 32)  # amax 1 per block: no overflow anywhere
    assert val(overflow_fraction(x, name)) == 0.0


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("name", list(FORMAT_SPECS))
def test_all_zero_and_empty_tensors(name: str):
    z = tensor_stats(torch.zeros(2, 32), name)
    assert set(z) == SPEC_KEYS
    assert {k: val(v) for k, v in z.items()} == {
        "norm": 0.0,
        "absmax": 0.0,
        "zero_frac": 1.0,
        "nonfinite_frac": 0.0,
        "underflow_frac": 0.0,  # no non-zero values: defined as 0
        "overflow_frac": 0.0,
        "sqnr_db": math.inf,  # q == x exactly
        "rel_error": 0.0,
    }
    e = tensor_stats(torch.empty(0, 32), name)
    assert {k: val(v) for k, v in e.items()} == {**{k: 0.0 for k in SPEC_KEYS}, "sqnr_db": math.inf}


def test_zero_dim_tensor_is_one_element():
    assert val(tensor_stats(torch.tensor(3.0), "mxfp4_e2m1")["sqnr_db"]) == math.inf
    assert quantize_like(torch.tensor(2.9), "mxfp4_e2m1").shape == ()


def test_nan_is_left_out_of_counts_and_poisons_its_mx_block():
    x = t(math.nan, 1.0, 0.5, 0.0)
    cast = tensor_stats(x, "bf16")
    assert val(cast["nonfinite_frac"]) == 0.25 and val(cast["norm"]) == pytest.approx(math.sqrt(1.25))
    assert val(cast["sqnr_db"]) == math.inf and val(cast["underflow_frac"]) == 0.0
    mx = tensor_stats(x, "mxfp8_e4m3")  # the block dequantizes to all NaN: its finite values are lost
    assert val(mx["sqnr_db"]) == -math.inf and val(mx["rel_error"]) == math.inf
    assert val(mx["underflow_frac"]) == 0.0 and val(mx["overflow_frac"]) == 0.0
    assert val(mx["absmax"]) == 1.0


def test_stats_keys_and_consistency_with_single_functions():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 1e-3
    assert set(tensor_stats(x)) == BASE_KEYS
    s = tensor_stats(x, "mxfp6_e2m3")
    assert set(s) == SPEC_KEYS
    assert all(v.dim() == 0 and v.dtype == torch.float32 for v in s.values())
    q = quantize_like(x, "mxfp6_e2m3")
    assert torch.equal(s["underflow_frac"], underflow_fraction(x, "mxfp6_e2m3"))
    assert torch.equal(s["overflow_frac"], overflow_fraction(x, "mxfp6_e2m3"))
    assert torch.equal(s["sqnr_db"], sqnr_db(x, q))
    assert torch.equal(s["rel_error"], relative_error(x, q))
    assert val(s["norm"]) == pytest.approx(torch.linalg.vector_norm(x.double()).item(), rel=1e-6)
    assert val(s["absmax"]) == x.abs().max().item()
    assert val(s["rel_error"]) == pytest.approx(10 ** (-val(s["sqnr_db"]) / 20), rel=1e-5)


def test_bf16_input_is_measured_in_float32():
    x = torch.randn(64, generator=torch.Generator().manual_seed(2)).bfloat16()
    assert val(tensor_stats(x, "bf16")["sqnr_db"]) == math.inf  # already bf16: exact
    assert quantize_like(x, "mxfp4_e2m1").dtype == torch.bfloat16


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from([n for n, s in FORMAT_SPECS.items() if s.family in ("mx", "cast")]),
    seed=st.integers(0, 2**16),
    log_scale=st.integers(-140, 100),
)
def test_block_aligned_shards_sum_to_the_whole(name: str, seed: int, log_scale: int):
    """Reduced tensor_sums of shards cut on block boundaries equal the whole tensor's stats."""
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(seed)) * 2.0**log_scale
    x[0, :8] = 0.0
    parts = [tensor_sums(x[:, :32], name), tensor_sums(x[:, 32:], name)]
    reduced = {
        k: torch.maximum(parts[0][k], parts[1][k]) if REDUCE_OPS[k] == "max" else parts[0][k] + parts[1][k]
        for k in parts[0]
    }
    whole = tensor_stats(x, name)
    for k, v in stats_from_sums(reduced).items():
        torch.testing.assert_close(v, whole[k], rtol=1e-6, atol=0, msg=k)
    assert 0.0 <= val(whole["underflow_frac"]) <= 1.0
    q = quantize_like(x, name)
    assert tensor_sums(x, name)["num_underflow"].item() == ((x != 0) & (q == 0)).sum().item()
