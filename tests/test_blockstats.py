"""recipes.blockstats and recipes.gemmstats against hand-computed cases (pure tensor math, no training)."""

from __future__ import annotations

import math

import pytest
import torch

from recipes.blockstats import (
    MX_GRID,
    _e4m3_round_up,
    _rounds_past_max,
    fp8_block_stats,
    fp8_block_sums,
    mx_block_stats,
    mx_block_sums,
    nvfp4_block_stats,
    scale_histogram,
)
from recipes.fp8 import cast_to_fp8_block_1d
from recipes.gemmstats import (
    gemm_errors,
    gemm_output_error,
    kurtosis,
    kurtosis_from_sums,
    kurtosis_sums,
    moment_underflow_from_sums,
    moment_underflow_sums,
    underflow_frac_bf16,
    underflow_frac_e4m3_scaled,
    update_ratio,
)
from recipes.mx import quantize_mx, quantize_nvfp4
from recipes.mx.core import block_amax, block_layout, to_blocks
from recipes.mx.nvfp4 import nvfp4_blocks, nvfp4_tensor_scale
from recipes.numerics import relative_error, sqnr_db

NAN = math.nan


def rows(width: int, *values: list[float]) -> torch.Tensor:
    """A ``(len(values), width)`` float32 tensor: row i starts with values[i], zeros after."""
    x = torch.zeros(len(values), width)
    for i, v in enumerate(values):
        x[i, : len(v)] = torch.tensor(v)
    return x


def val(t: torch.Tensor) -> float:
    assert t.dim() == 0 and t.dtype == torch.float32
    return float(t)


# ---------------------------------------------------------------- GEMM error


def test_gemm_output_error_equal_and_hand_case():
    y = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    same = gemm_output_error(y.clone(), y)
    assert val(same["sqnr_db"]) == math.inf and val(same["rel_error"]) == 0.0
    e = gemm_output_error(y + 0.5, y)  # sum y^2 = 30, sum err^2 = 4 * 0.25 = 1
    assert val(e["sqnr_db"]) == pytest.approx(10 * math.log10(30.0))
    assert val(e["rel_error"]) == pytest.approx(math.sqrt(1 / 30))


def test_gemm_errors_known_operand_errors():
    a, b = torch.eye(2), torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = gemm_errors(a, b, lambda t: 2 * t, lambda t: t + 0.5)
    # both: (2I)(b + 0.5) - b = b + 1 = [[2,3],[4,5]], sum^2 = 54, sum b^2 = 30
    assert val(out["sqnr_db"]) == pytest.approx(10 * math.log10(30 / 54))
    assert val(out["rel_error"]) == pytest.approx(math.sqrt(54 / 30))
    assert val(out["a_sqnr_db"]) == pytest.approx(0.0, abs=1e-6)  # 2b - b = b: 0 dB
    assert val(out["b_sqnr_db"]) == pytest.approx(10 * math.log10(30.0))  # error 0.5 everywhere
    assert set(out) == {"sqnr_db", "rel_error", "a_sqnr_db", "b_sqnr_db"}


def test_gemm_errors_identity_a_gives_b_error_exactly():
    b = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    qb = quantize_mx(b, "fp4_e2m1", axis=0)
    out = gemm_errors(torch.eye(64), b, lambda t: t, lambda t: quantize_mx(t, "fp4_e2m1", axis=0))
    assert torch.equal(out["sqnr_db"], sqnr_db(b, qb)) and torch.equal(out["b_sqnr_db"], sqnr_db(b, qb))
    assert torch.equal(out["rel_error"], relative_error(b, qb))
    assert val(out["a_sqnr_db"]) == math.inf


# ---------------------------------------------------------------- MX


FP4_ROWS = (
    [7.0, 1.0],  # floor: se = floor(log2 7) - 2 = 0, 7 > 6 clamps -> [6, 1]; rceil: se 1 -> [8, 1]
    [1.0, 2.0**-5],  # se = -2 both rules (1/6 -> ceil(-2.58) = -2); 2^-5 / 2^-2 = 0.125 -> 0
    [2.0**-130],  # se = -132 -> -127: 2^-130 / 2^-127 = 0.125 -> 0: the block vanishes
    [],  # all zero: not live
    [6.5],  # floor: 6.5 -> 6 (clamped); rceil: se 1, 3.25 -> 3 -> 6: other scale, same value
)


def test_mx_fp4_hand_blocks_floor():
    s = mx_block_stats(rows(32, *FP4_ROWS), fmt="fp4_e2m1")
    # live blocks: rows 0, 1, 2, 4
    assert val(s["saturated_frac"]) == 0.5  # rows 0 and 4
    assert val(s["zero_block_frac"]) == 0.25  # row 2
    assert val(s["rule_sensitive_frac"]) == 0.25  # row 0 only ([6, 1] vs [8, 1])
    assert val(s["dyn_range_log2"]) == pytest.approx((math.log2(7) + 5.0) / 2)  # rows 0, 1
    assert val(s["nonfinite_block_frac"]) == 0.0
    assert s["scale_exponents"].dtype == torch.int32
    assert s["scale_exponents"].flatten().tolist() == [0, -2, -127, -127, 0]
    assert s["scale_exponents"].shape == (5, 1)


def test_mx_fp4_hand_blocks_rceil_never_saturates():
    s = mx_block_stats(rows(32, *FP4_ROWS), fmt="fp4_e2m1", scale_rule="rceil")
    assert val(s["saturated_frac"]) == 0.0
    assert val(s["zero_block_frac"]) == 0.25
    assert val(s["rule_sensitive_frac"]) == 0.25  # always floor vs rceil
    assert s["scale_exponents"].flatten().tolist() == [1, -2, -127, -127, 1]


def test_mx_quantized_values_behind_the_hand_case():
    x = rows(32, *FP4_ROWS)
    floor, rceil = quantize_mx(x, "fp4_e2m1"), quantize_mx(x, "fp4_e2m1", scale_rule="rceil")
    assert floor[0, :2].tolist() == [6.0, 1.0] and rceil[0, :2].tolist() == [8.0, 1.0]
    assert floor[4, 0] == rceil[4, 0] == 6.0
    assert not floor[2].any()


def test_mx_fp8_e4m3_power_of_two_amax():
    # emax 8, max 448 = 1.75 * 2^8. amax 8 = 2^3: floor se = 3 - 8 = -5, 8 / 2^-5 = 256 <= 448;
    # rceil ceil(log2(8/448)) = ceil(-5.81) = -5: same. amax 15: floor se -5, 480 > 448 -> 448 * 2^-5 = 14;
    # rceil ceil(log2(15/448)) = ceil(-4.90) = -4: 240 is on the grid -> 15.
    s = mx_block_stats(rows(32, [8.0], [15.0, 1.0]), fmt="fp8_e4m3")
    assert val(s["saturated_frac"]) == 0.5
    assert val(s["rule_sensitive_frac"]) == 0.5
    assert val(s["dyn_range_log2"]) == pytest.approx(math.log2(15))
    assert s["scale_exponents"].flatten().tolist() == [-5, -5]


def test_mx_nan_block_is_left_out():
    s = mx_block_stats(rows(32, *FP4_ROWS, [NAN, 1.0]), fmt="fp4_e2m1")
    assert val(s["nonfinite_block_frac"]) == pytest.approx(1 / 6)
    assert val(s["saturated_frac"]) == 0.5 and val(s["zero_block_frac"]) == 0.25
    assert s["scale_exponents"][-1].item() == 128  # E8M0 NaN byte 0xFF - 127


def test_mx_axis_and_padding():
    x = rows(32, *FP4_ROWS)
    a, b = mx_block_stats(x, fmt="fp4_e2m1"), mx_block_stats(x.T.contiguous(), fmt="fp4_e2m1", axis=0)
    for k in ("saturated_frac", "zero_block_frac", "rule_sensitive_frac", "dyn_range_log2"):
        assert torch.equal(a[k], b[k]), k
    assert b["scale_exponents"].shape == (1, 5)
    # 33 elements: block [1]*32 (dyn range 0, se -2) and the padded block [7] (saturates, se 0)
    s = mx_block_stats(torch.tensor([1.0] * 32 + [7.0]), fmt="fp4_e2m1")
    assert val(s["saturated_frac"]) == 0.5 and val(s["dyn_range_log2"]) == 0.0
    assert s["scale_exponents"].tolist() == [-2, 0]


def test_mx_empty_and_bad_rule():
    s = mx_block_stats(torch.zeros(0, 32), fmt="fp4_e2m1")
    assert all(val(s[k]) == 0.0 for k in s if k != "scale_exponents")
    assert s["scale_exponents"].shape == (0, 1)
    with pytest.raises(ValueError, match="scale_rule"):
        mx_block_stats(torch.ones(32), fmt="fp4_e2m1", scale_rule="round")


# ---------------------------------------------------------------- NVFP4

# tensor amax 2688 = 6 * 448 -> s_t = 1 exactly; s = clamp(amax_b / 6, 2^-6, 448)
NV_ROWS = (
    [2688.0, 336.0],  # s = 448, code 0x7E; dyn range 3
    [6.375],  # s = 1.0625: RNE tie -> 1.0 (0x38), v = 6.375 -> 6; up: 1.125, 5.67 -> 6 -> 6.75
    [2.0**-9],  # s = 2^-9 / 6: TE rounds it to 0 (code 0x00), the block vanishes; up: 2^-9, exact.
    #             torchao clamps s to 2^-6 (0x08): v = 0.125 -> 0 either way
    [3.0, 3.0 * 2**-5],  # s = 0.5 exact (0x30); dyn range 5
    [],  # zero block: s = 0 (TE) / 2^-6 (torchao), not live
)


@pytest.mark.parametrize(
    "order, codes, sensitive",
    [("te", [0x7E, 0x38, 0x00, 0x30, 0x00], 0.5), ("torchao", [0x7E, 0x38, 0x08, 0x30, 0x08], 0.25)],
)
def test_nvfp4_hand_blocks(order, codes, sensitive):
    x = rows(16, *NV_ROWS)
    s = nvfp4_block_stats(x, order=order)
    assert val(s["tensor_scale"]) == 1.0
    assert s["scale_codes"].dtype == torch.uint8
    assert s["scale_codes"].flatten().tolist() == codes
    assert val(s["saturated_frac"]) == 0.0  # 6.375 clamps to 6 but would round to 6 anyway; a zero
    #                                          scale (TE, row 2) flushes its block, it does not saturate
    assert val(s["zero_block_frac"]) == 0.25
    assert val(s["rule_sensitive_frac"]) == sensitive  # row 1: 6 vs 6.75; TE also row 2: 0 vs 2^-9
    assert val(s["dyn_range_log2"]) == pytest.approx(4.0)  # rows 0 (3) and 3 (5)
    assert quantize_nvfp4(x, order=order)[1, 0] == 6.0


def test_nvfp4_fixed_tensor_scale_saturates():
    # s_t = 1: 5376 / 6 = 896 clamps to 448, v = 12 >= 7; 6.375 stays below 7
    s = nvfp4_block_stats(rows(16, [5376.0], [6.375], [NAN]), per_tensor_scale=1.0)
    assert val(s["saturated_frac"]) == 0.5
    assert val(s["nonfinite_block_frac"]) == pytest.approx(1 / 3)
    assert s["scale_codes"].flatten().tolist() == [0x7E, 0x38, 0x7F]


def test_e4m3_round_up():
    s = torch.tensor([1.0, 1.0625, 1.0000001, 417.0, 448.0, 2.0**-6, NAN])
    got = _e4m3_round_up(s)
    assert got[:-1].tolist() == [1.0, 1.125, 1.125, 448.0, 448.0, 2.0**-6] and got[-1].isnan()
    r = torch.rand(4096, generator=torch.Generator().manual_seed(1)) * 447 + 2.0**-6
    up = _e4m3_round_up(r)
    below = (up.to(torch.float8_e4m3fn).view(torch.uint8) - 1).view(torch.float8_e4m3fn).float()
    assert (up >= r).all() and (below < r).all()


@pytest.mark.parametrize("order", ["te", "torchao"])
def test_nvfp4_mirror_matches_quantize_nvfp4_bit_for_bit(order):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 48, generator=g) * torch.exp2(torch.randn(64, 1, generator=g) * 6)
    x[3], x[5, 7], x[9, :16] = 0.0, NAN, 1e-30
    layout = block_layout(x.shape, block_size=16, axis=-1)
    xb = to_blocks(x, layout)
    amax_b = block_amax(xb)
    finite = torch.isfinite(amax_b)
    ts = nvfp4_tensor_scale(torch.where(finite, amax_b, 0.0).amax(), order=order)
    if order == "torchao":
        s_b = ((amax_b / 6) / ts.dec).clamp(2.0**-6, 448.0).to(torch.float8_e4m3fn).float()
    else:
        s_b = (amax_b.abs() * (ts.enc * torch.tensor(1 / 6))).clamp(max=448.0).to(torch.float8_e4m3fn).float()
    got, want = nvfp4_blocks(xb, ts, s_b, finite), to_blocks(quantize_nvfp4(x, order=order), layout)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got.signbit(), want.signbit())


# ---------------------------------------------------------------- FP8 1x128

FP8_ROWS = (
    [56.0],  # 448/56 = 8 = 2^3: both scales equal
    [300.0],  # pow2 scale 1: 300 -> 288; exact 448/300: -> 300 (to an ulp)
    [2.0**-140],  # scale overflows -> FLT_MAX (pow2: 2^127): 2^-11 / 2^-13 -> 0 both
    [1.0, 2.0**-5],  # scales 256 / 448: 1 and 2^-5 exact under both (14/448 = 2^-5); dyn range 5
    [],  # zero block: scale 1, not live
    [NAN, 1.0],  # non-finite
)


@pytest.mark.parametrize("p2", [True, False])
def test_fp8_block_hand_blocks(p2):
    x = rows(128, *FP8_ROWS)
    s = fp8_block_stats(x, power_2_scales=p2)
    assert val(s["saturated_frac"]) == 0.0
    assert val(s["zero_block_frac"]) == 0.25  # row 2
    assert val(s["rule_sensitive_frac"]) == 0.25  # row 1
    assert val(s["dyn_range_log2"]) == 5.0
    assert val(s["nonfinite_block_frac"]) == pytest.approx(1 / 6)
    want = [8.0, 1.0, 2.0**127, 256.0, 1.0, 256.0] if p2 else [8.0, 448 / 300, 3.4028234663852886e38, 448.0]
    assert s["scales"].flatten()[: len(want)].tolist() == pytest.approx(want, rel=1e-7)
    _, scale_inv = cast_to_fp8_block_1d(x, power_2_scales=p2)
    assert torch.equal(torch.reciprocal(s["scales"]), scale_inv)


def test_fp8_exact_scale_ulp_clamp_is_not_saturation():
    a = torch.arange(1, 2000, dtype=torch.float32) * 0.37
    hits = a[a * (448.0 / a) > 448.0]  # fp32(448/a) rounds up: amax * scale is 448 + 1 ulp
    assert hits.numel() > 0
    s = fp8_block_stats(torch.full((128,), float(hits[0])), power_2_scales=False)
    assert val(s["saturated_frac"]) == 0.0


def test_rounds_past_max_bounds():
    def past(values, max_value, mbits):
        return _rounds_past_max(torch.tensor(values), max_value, mbits).tolist()

    assert past([6.99, 7.0], 6.0, 1) == [False, True]  # E2M1: 7 ties to 8 (6's index 3 odd)
    assert past([464.0, 464.01], 448.0, 3) == [False, True]  # E4M3: 464 ties to 448 (index 14 even)
    assert past([61439.0, 61440.0], 57344.0, 2) == [False, True]  # E5M2


# ---------------------------------------------------------------- distribution, optimizer state


def test_kurtosis_hand_cases():
    assert val(kurtosis(torch.tensor([-1.0, 1.0] * 8))) == pytest.approx(1.0)
    # [0, 0, 0, x]: mu = x/4, m2 = 3x^2/16, m4 = 21x^4/256 -> (21/256) / (9/256) = 7/3, for any x
    for v in (5.0, 1e-3, -2e4):
        assert val(kurtosis(torch.tensor([0.0, 0.0, 0.0, v] * 3))) == pytest.approx(7 / 3, rel=1e-6)
    assert val(kurtosis(torch.tensor([0.0, 0.0, 0.0, 5.0, math.inf, NAN]))) == pytest.approx(7 / 3)
    assert val(kurtosis(torch.full((8,), 3.0))) == 0.0 and val(kurtosis(torch.zeros(0))) == 0.0
    g = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    assert val(kurtosis(g)) == pytest.approx(3.0, abs=0.06)


def test_update_ratio():
    assert val(update_ratio(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 10.0]))) == pytest.approx(0.5)
    assert val(update_ratio(torch.zeros(3), torch.zeros(3))) == 0.0
    assert val(update_ratio(torch.ones(3), torch.zeros(3))) == math.inf
    assert math.isnan(val(update_ratio(torch.tensor([1.0, NAN]), torch.ones(2))))


def test_underflow_frac_bf16():
    # BF16 smallest subnormal 2^-133 (~9.18e-41): 1e-40 rounds to it, 3 * 2^-135 = 0.75 * 2^-133 too;
    # 2^-134 is the tie (to even: 0), 2^-135 below it; the exact 0 is not counted
    x = torch.tensor([1.0, 1e-40, 2.0**-134, -(2.0**-135), 3 * 2.0**-135, 0.0])
    assert val(underflow_frac_bf16(x)) == pytest.approx(2 / 5)


def test_underflow_frac_e4m3_scaled():
    # amax 448 -> scale 1: E4M3 smallest subnormal 2^-9; 2^-10 ties to 0, 2^-11 below, 1.5 * 2^-10 -> 2^-9
    x = torch.tensor([448.0, 2.0**-9, 2.0**-10, 2.0**-11, 1.5 * 2**-10, 0.0])
    assert val(underflow_frac_e4m3_scaled(x)) == pytest.approx(2 / 5)
    # amax 7 -> scale 448/7 = 64: 2^-16 -> 2^-10 (tie, 0), 2^-15 -> 2^-9 survives
    assert val(underflow_frac_e4m3_scaled(torch.tensor([7.0, 2.0**-16, 2.0**-15]))) == pytest.approx(1 / 3)


# ---------------------------------------------------------------- additive forms (micro-batches, ranks)


def test_kurtosis_sums_add_and_match_two_pass():
    # [0, 0, 0, x] in two shards: power sums add, the binomial expansion gives 7/3 again
    a, b = kurtosis_sums(torch.tensor([0.0, 0.0])), kurtosis_sums(torch.tensor([0.0, 4.0, math.inf]))
    assert val(kurtosis_from_sums({k: a[k] + b[k] for k in a})) == pytest.approx(
        7 / 3, rel=1e-7
    )  # float32 out
    g = torch.randn(4096, generator=torch.Generator().manual_seed(1)) * 3 + 0.5
    assert val(kurtosis_from_sums(kurtosis_sums(g))) == pytest.approx(val(kurtosis(g)), rel=1e-6)


def test_scale_histogram_of_the_hand_blocks():
    """The E8M0 codes of the FP4 hand case's live blocks (0, -2, -127, 0; the all-zero row has
    no scale) as W&B's histogram layout: occupied range only, one bin per code, shifted edges
    for the rank normalisation."""
    counts = mx_block_sums(rows(32, *FP4_ROWS), fmt="fp4_e2m1")["scale_hist"]
    assert counts.dtype == torch.int64 and counts.shape == (MX_GRID.bins,) and int(counts.sum()) == 4
    h = scale_histogram(counts.tolist(), MX_GRID)
    assert h["_type"] == "histogram" and h["bins"][0] == -127.0 and h["bins"][-1] == 1.0
    assert len(h["values"]) == 128 and h["values"][0] == 1 and h["values"][125] == 1 and h["values"][127] == 2
    assert scale_histogram(counts.tolist(), MX_GRID, shift=-1.0)["bins"][0] == -128.0
    assert scale_histogram([0] * MX_GRID.bins, MX_GRID) == {"_type": "histogram", "bins": [-127.0, -126.0],
                                                            "values": [0]}  # fmt: skip


def test_moment_underflow_sums_hand_case():
    # amax 448 -> E4M3 scale 1: 2^-10 and 2^-11 flush in E4M3, nothing flushes in BF16; 0 not counted
    s = moment_underflow_sums(torch.tensor([448.0, 2.0**-9, 2.0**-10, 2.0**-11, 0.0]))
    assert (int(s["nonzero"]), int(s["bf16"]), int(s["e4m3"])) == (4, 0, 2)
    fr = moment_underflow_from_sums(s)
    assert val(fr["underflow_e4m3"]) == 0.5 and val(fr["underflow_bf16"]) == 0.0


# ---------------------------------------------------------------- 2-D weight tiles


def test_nvfp4_16x16_tiles_hand_case():
    # 32 x 32: four tiles. Tensor amax 2688 = 6 * 448, so s_t = 1 exactly.
    w = torch.zeros(32, 32)
    w[0:16, 16:32] = 1.05  # s = 1.05/6 = 0.175: E4M3 nearest 0.171875 (< s), up 0.1875 -> values change
    w[16:32, 0:16] = 1e-3  # s = 1.7e-4 rounds to E4M3 0: a zero block (up: 2^-9, 0.512 -> 0.5: changes)
    w[16:32, 16:32] = 1.0
    w[16, 16] = 2688.0  # s_b = 448 exactly; the other 255 elements (1/448) round to 0, the tile lives
    st = nvfp4_block_stats(w, two_d=True)
    assert float(st["tensor_scale"]) == 1.0
    assert st["scale_codes"].shape == (2, 2)
    assert float(st["nonfinite_block_frac"]) == 0.0
    # live: the three non-zero tiles
    assert float(st["zero_block_frac"]) == pytest.approx(1 / 3)
    assert float(st["rule_sensitive_frac"]) == pytest.approx(2 / 3)
    assert float(st["saturated_frac"]) == 0.0
    assert float(st["dyn_range_log2"]) == pytest.approx(math.log2(2688.0) / 3)
    codes = st["scale_codes"].view(torch.float8_e4m3fn).float()
    assert codes.tolist() == [[0.0, 0.171875], [0.0, 448.0]]  # TE's order: no 2^-6 floor
    ao = nvfp4_block_stats(w, two_d=True, order="torchao")  # torchao: the floor 2^-6, 0.064 -> 0 either way
    assert ao["scale_codes"].view(torch.float8_e4m3fn).float().tolist() == [
        [2.0**-6, 0.171875],
        [2.0**-6, 448.0],
    ]
    assert float(ao["rule_sensitive_frac"]) == pytest.approx(1 / 3)
    # the per-element path on the same tensor is a different blocking: 1x16 along K
    assert nvfp4_block_stats(w)["scale_codes"].shape == (32, 2)
    with pytest.raises(ValueError, match="2-D"):
        nvfp4_block_stats(w[0], two_d=True)
    with pytest.raises(ValueError, match="tensor scale"):
        nvfp4_block_stats(w, two_d=True, per_tensor_scale=1.0)


@pytest.mark.parametrize("p2", [True, False])
def test_fp8_128x128_tiles_equal_1d_blocks_of_the_tiles_as_rows(p2):
    # a 128x128 tile holds the same 16384 values as one 1 x 16384 block: same amax, same scale,
    # same quantized values, so the statistics must agree (an independent path through the 1-D code)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(256, 384, generator=g) * torch.logspace(-3, 2, 384)  # columns over 5 decades
    w[128:, 256:] = 0.0  # one empty tile
    w[0, 0] = float("nan")  # one non-finite tile
    two = fp8_block_stats(w, block_size=128, two_d=True, power_2_scales=p2)
    rows = w.view(2, 128, 3, 128).permute(0, 2, 1, 3).reshape(6, 128 * 128)
    one = fp8_block_stats(rows, block_size=128 * 128, power_2_scales=p2)
    for k in (
        "saturated_frac",
        "zero_block_frac",
        "rule_sensitive_frac",
        "dyn_range_log2",
        "nonfinite_block_frac",
    ):
        assert float(two[k]) == float(one[k]), k
    assert float(two["nonfinite_block_frac"]) == pytest.approx(1 / 6)
    assert two["scales"].shape == (2, 3)
    assert torch.equal(two["scales"].flatten(), one["scales"].flatten())
    assert float(two["rule_sensitive_frac"]) > 0  # exact vs power-of-two scales differ somewhere
    sums_two = fp8_block_sums(w, block_size=128, two_d=True, power_2_scales=p2)
    sums_one = fp8_block_sums(rows, block_size=128 * 128, power_2_scales=p2)
    assert torch.equal(sums_two["scale_hist"], sums_one["scale_hist"])


def test_fp8_tiles_pad_the_edges():
    w = torch.ones(130, 100)  # 2 x 1 tiles of 128, the second holds 2 rows
    st = fp8_block_stats(w, block_size=128, two_d=True)
    assert st["scales"].shape == (2, 1)
    assert float(st["zero_block_frac"]) == 0.0 and float(st["dyn_range_log2"]) == 0.0
