"""FP8 emulation: formats against an independent RNE grid reference, scale rules, current and delayed scaling.

Expected values are worked out by hand in the comments; the dense-grid test
compares torch's float8 cast path with a rounding reference built from the
formats' bit layouts (no torch float8 involved).
"""

from __future__ import annotations

import math

import pytest
import torch

from recipes.fp8 import (
    E4M3,
    E5M2,
    DelayedScaling,
    DelayedScalingState,
    Float8CurrentScaling,
    amax,
    cast_to_fp8,
    compute_scale,
    current_scale,
    dequantize_fp8,
    get_format,
    quantize_fp8,
    quantize_fp8_current,
    round_scale_down_to_power_of_2,
)

F32 = torch.float32
NAN, INF = math.nan, math.inf
FLT_MAX = torch.finfo(F32).max


def t(*vals: float) -> torch.Tensor:
    return torch.tensor(vals, dtype=F32)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (distinguishes -0.0 from +0.0, NaN == NaN)."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    both_nan = a.isnan() & b.isnan()
    return a.shape == b.shape and bool(((a.view(torch.int64) == b.view(torch.int64)) | both_nan).all())


# ---------------------------------------------------------------- independent reference
# (exponent bits, mantissa bits, bias, specials) written out here, not read from recipes.fp8
LAYOUT = {"e4m3": (4, 3, 7, "fn"), "e5m2": (5, 2, 15, "ieee")}


def finite_grid(name: str) -> torch.Tensor:
    """All non-negative finite values in code order (index == bit code), float64."""
    ebits, mbits, bias, specials = LAYOUT[name]
    vals = []
    for e in range(2**ebits):
        for k in range(2**mbits):
            frac = k / 2**mbits
            vals.append(frac * 2.0 ** (1 - bias) if e == 0 else (1 + frac) * 2.0 ** (e - bias))
    vals = vals[:-1] if specials == "fn" else vals[: -(2**mbits)]  # e4m3fn: S.1111.111 is NaN; e5m2: e=31
    return torch.tensor(vals, dtype=torch.float64)


def rne_reference(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Saturating round-to-nearest-even onto ``grid`` (float64 math; ties pick the even code)."""
    x64 = x.to(torch.float64)
    a = x64.abs().clamp(max=grid[-1].item())
    hi_idx = torch.searchsorted(grid, a).clamp(max=len(grid) - 1)
    lo_idx = (hi_idx - 1).clamp(min=0)
    hi, lo = grid[hi_idx], grid[lo_idx]
    d_hi, d_lo = hi - a, a - lo
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi_idx % 2 == 0))
    r = torch.where(hi == a, a, torch.where(pick_hi, hi, lo))
    r = torch.copysign(r, x64)
    return torch.where(x64.isnan(), x64, r)


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_reference_grid_matches_torch_codes_and_format_constants(name):
    fmt = get_format(name)
    grid = finite_grid(name)
    codes = torch.arange(len(grid), dtype=torch.uint8).view(fmt.dtype).to(torch.float64)
    assert torch.equal(codes, grid)
    assert grid[-1].item() == fmt.max
    assert grid[1].item() == fmt.min_subnormal
    assert grid[2 ** LAYOUT[name][1]].item() == fmt.min_normal


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_grid_values_round_trip_exactly(name):
    grid = finite_grid(name).to(F32)
    vals = torch.cat([grid, -grid])
    assert same_bits(quantize_fp8(vals, name, 1.0), vals)
    # with a power-of-2 scale the round trip is exact as well
    assert same_bits(quantize_fp8(vals / 8, name, 8.0), vals / 8)


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_dense_fp32_grid_matches_independent_rne(name):
    fmt = get_format(name)
    grid = finite_grid(name)
    top = torch.tensor(fmt.max * 1.15, dtype=F32).view(torch.int32).item()
    bits = torch.arange(0, top, 997, dtype=torch.int32)
    dense = bits.view(F32)
    mids = ((grid[1:] + grid[:-1]) / 2).to(F32)  # exact in fp32: fp8 ties are fp32 values
    near = torch.cat([mids, torch.nextafter(mids, t(INF)), torch.nextafter(mids, t(0.0))])
    tiny = torch.logspace(-60, -5, 4001, base=2.0, dtype=F32)
    x = torch.cat([dense, near, tiny, grid.to(F32)])
    x = torch.cat([x, -x])
    assert same_bits(quantize_fp8(x, fmt, 1.0), rne_reference(x, grid))
    # a non-trivial scale: the reference sees the same fp32 product x*scale
    s = torch.tensor(448.0 / 3.0, dtype=F32)
    xs = torch.randn(20000, generator=torch.Generator().manual_seed(0)) * 3
    q, _ = cast_to_fp8(xs, fmt, s)
    assert same_bits(q.to(torch.float64), rne_reference(xs * s, grid))


def test_rne_ties_and_values():
    # e4m3 has 3 mantissa bits: spacing 2^-3 in [1, 2)
    assert quantize_fp8(t(1 + 2**-4), E4M3, 1.0).item() == 1.0  # tie 1.0 | 1.125 -> even 1.0
    assert quantize_fp8(t(1 + 3 * 2**-4), E4M3, 1.0).item() == 1.25  # tie 1.125 | 1.25 -> even 1.25
    assert quantize_fp8(t(1 + 2**-4 + 2**-20), E4M3, 1.0).item() == 1.125  # above the tie
    # e5m2 has 2 mantissa bits: spacing 2^-2 in [1, 2)
    assert quantize_fp8(t(1 + 2**-3), E5M2, 1.0).item() == 1.0
    assert quantize_fp8(t(1 + 3 * 2**-3), E5M2, 1.0).item() == 1.5
    assert quantize_fp8(t(-(1 + 3 * 2**-4)), E4M3, 1.0).item() == -1.25


def test_saturation_at_max():
    x = t(448, 449, 464, 479, 1e30, INF, -500, -INF)
    assert quantize_fp8(x, E4M3, 1.0).tolist() == [448, 448, 448, 448, 448, 448, -448, -448]
    y = t(57344, 61439, 61440, 1e30, INF, -INF)
    out = quantize_fp8(y, E5M2, 1.0)
    assert out.tolist() == [57344, 57344, 57344, 57344, 57344, -57344]  # never Inf (TE satfinite)
    # saturation happens after scaling: 2.0 * 300 = 600 -> 448 -> 448 / 300
    assert quantize_fp8(t(2.0), E4M3, 300.0).item() == pytest.approx(448 / 300, rel=1e-7)


def test_subnormals_and_flush_to_zero():
    s = 2.0**-9  # smallest e4m3 subnormal
    x = t(s, 2 * s, 7 * s, s / 2, s / 2 * (1 + 2**-23), 3 * s / 2, s / 4, -s / 4, -(s / 2))
    out = quantize_fp8(x, E4M3, 1.0)
    # s/2 is a tie 0 | s -> even 0; one fp32 ulp above -> s; 1.5 s tie s | 2s -> 2s (even code)
    assert same_bits(out, t(s, 2 * s, 7 * s, 0.0, s, 2 * s, 0.0, -0.0, -0.0))
    s5 = 2.0**-16  # smallest e5m2 subnormal
    out5 = quantize_fp8(t(s5, s5 / 2, 0.75 * s5, 3 * s5), E5M2, 1.0)
    assert out5.tolist() == [s5, 0.0, s5, 3 * s5]
    # underflow through the scale: x * scale below half a subnormal
    assert quantize_fp8(t(1e-3), E4M3, 2.0**-1).item() == 0.0


def test_nan_propagates():
    x = t(NAN, 1.0, -NAN, INF)
    for fmt in (E4M3, E5M2):
        out = quantize_fp8(x, fmt, 2.0)
        assert out[0].isnan() and out[2].isnan() and out[1].item() == 1.0
        assert out[3].item() == fmt.max / 2


def test_dtype_shape_preserved_and_cast_interop():
    x = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    out = quantize_fp8(x, E4M3, 64.0)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    q, scale_inv = cast_to_fp8(x, "E4M3", torch.tensor(64.0))
    assert q.dtype == torch.float8_e4m3fn and scale_inv.item() == 1 / 64
    assert same_bits(dequantize_fp8(q, scale_inv, dtype=torch.bfloat16), out)
    # non power-of-2 scale: scale_inv = fp32(1/scale), dequantize multiplies (TE), quantize divides
    s = torch.tensor(448.0 / 3.0)
    q, scale_inv = cast_to_fp8(x.float(), E4M3, s)
    assert scale_inv.item() == torch.reciprocal(s).item()
    assert torch.allclose(dequantize_fp8(q, scale_inv), quantize_fp8(x.float(), E4M3, s), rtol=2**-23, atol=0)


def test_amax_ignores_nan_keeps_inf():
    assert amax(t(1.0, NAN, -3.0)).item() == 3.0
    assert amax(t(1.0, -INF, NAN)).item() == INF
    assert amax(torch.empty(0)).item() == 0.0
    assert amax(torch.tensor([[1.0, -5.0], [NAN, 2.0]]), dim=1).tolist() == [5.0, 2.0]


# ---------------------------------------------------------------- scale rule
def test_compute_scale_formula_and_margin():
    assert compute_scale(3.0, E4M3).item() == (torch.tensor(448.0) / torch.tensor(3.0)).item()
    assert compute_scale(1.0, E4M3, margin=2).item() == 112.0  # (448 / 1) / 2^2
    assert compute_scale(2.0, E5M2, margin=1).item() == 14336.0  # (57344 / 2) / 2
    # amax 0, Inf, NaN -> previous scale (TE keeps the old scale); 1.0 when there is none
    for bad in (0.0, INF, NAN):
        assert compute_scale(bad, E4M3, prev_scale=7.0).item() == 7.0
        assert compute_scale(bad, E4M3).item() == 1.0
    # amax so small that 448/amax overflows fp32 -> FLT_MAX
    assert compute_scale(1e-45, E4M3).item() == FLT_MAX
    # vectorised
    v = compute_scale(t(1.0, 0.0, 4.0), E4M3, prev_scale=t(5.0, 6.0, 7.0))
    assert v.tolist() == [448.0, 6.0, 112.0]


def test_power_of_2_scales_and_epsilon():
    assert compute_scale(3.0, E4M3, power_2_scale=True).item() == 128.0  # 149.33 -> 128
    assert compute_scale(3.5, E4M3, power_2_scale=True).item() == 128.0  # exactly 128
    assert compute_scale(3.0, E5M2, power_2_scale=True).item() == 16384.0  # 19114.67 -> 2^14
    assert compute_scale(500.0, E4M3, power_2_scale=True).item() == 0.5  # 0.896 -> 0.5
    assert compute_scale(1e-45, E4M3, power_2_scale=True).item() == 2.0**127  # FLT_MAX -> 2^127
    below_two = 2.0 - 2**-23  # the fp32 just below 2
    r = round_scale_down_to_power_of_2(t(below_two, 2.0, 3.0, 0.75, 2.0**-100, 1e30))
    assert r.tolist() == [1.0, 2.0, 2.0, 0.5, 2.0**-100, 2.0**99]
    # epsilon floors amax first (so amax 0 no longer keeps the old scale)
    want = (torch.tensor(448.0) / torch.tensor(1e-3)).item()
    assert compute_scale(0.0, E4M3, amax_epsilon=1e-3).item() == want
    assert compute_scale(1e-6, E4M3, amax_epsilon=1e-3).item() == want
    assert compute_scale(2.0, E4M3, amax_epsilon=1e-3).item() == 224.0


# ---------------------------------------------------------------- current scaling
def test_current_scaling():
    x = t(1.0, -3.0, 2.0, NAN)
    s = current_scale(x, E4M3)
    assert s.item() == (torch.tensor(448.0) / 3.0).item()  # NaN ignored in amax
    out = quantize_fp8_current(x, E4M3)
    assert same_bits(out, quantize_fp8(x, E4M3, s))
    assert out[1].item() == pytest.approx(-3.0, rel=1e-6) and out[3].isnan()
    assert current_scale(torch.zeros(3), E4M3).item() == 1.0
    assert current_scale(t(1.0, INF), E4M3).item() == 1.0  # TE: Inf amax -> scale 1
    assert current_scale(x, E4M3, power_2_scale=True).item() == 128.0
    recipe = Float8CurrentScaling()
    assert recipe.format_for("input") is E4M3 and recipe.format_for("grad_output") is E5M2
    g = t(0.5, -7.0)
    assert same_bits(recipe.quantize(g, "grad_output"), quantize_fp8(g, E5M2, 57344.0 / 7.0))
    assert Float8CurrentScaling(fp8_format="E4M3").format_for("grad_output") is E4M3


# ---------------------------------------------------------------- delayed scaling
# amaxes per optimizer step (micro-batches inside a step); history length 3, E4M3 (max 448)
STEPS = [[2.0, 4.0], [1.0], [2.0], [0.5], [0.5], [0.25]]
# "max": window = this step and the 2 before it:
#   max(4)=4 ->112, max(4,1)=4 ->112, max(4,1,2)=4 ->112, max(1,2,.5)=2 ->224,
#   max(2,.5,.5)=2 ->224, max(.5,.5,.25)=.5 ->896
SCALES_MAX = [112.0, 112.0, 112.0, 224.0, 224.0, 896.0]
SCALES_MOST_RECENT = [112.0, 448.0, 224.0, 896.0, 896.0, 1792.0]
# history after each step: row 0 zeroed, newest at row L-1 (TE's roll)
HISTORIES = [[0, 0, 4], [0, 4, 1], [0, 1, 2], [0, 2, 0.5], [0, 0.5, 0.5], [0, 0.5, 0.25]]


@pytest.mark.parametrize(("algo", "expected"), [("max", SCALES_MAX), ("most_recent", SCALES_MOST_RECENT)])
def test_delayed_scale_sequence(algo, expected):
    recipe = DelayedScaling(fp8_format="E4M3", amax_history_len=3, amax_compute_algo=algo)
    state = DelayedScalingState(recipe)
    name = "blocks.0.attn.qkv/input"
    used = 1.0  # TE's initial scale
    for step, mbs in enumerate(STEPS):
        for a in mbs:
            x = t(a, -a / 3, 300.0 * a / 448 if step else 0.0)
            out = state.quantize(name, x)
            assert same_bits(out, quantize_fp8(x, E4M3, used))  # scale from steps < t only
            assert state.scale(name).item() == used
        assert state.amax_history[0, 0].item() == max(mbs)  # micro-batches max-combine
        state.step()
        assert state.amax_history[:, 0].tolist() == HISTORIES[step]
        used = expected[step]
        assert state.scale(name).item() == used
    assert state.num_steps == len(STEPS)


def test_delayed_first_use_scale_one_saturates():
    state = DelayedScalingState(DelayedScaling())
    out = state.quantize("l/input", t(1000.0, 1.0))
    assert out.tolist() == [448.0, 1.0]  # scale 1.0: 1000 saturates
    state.step()
    assert state.scale("l/input").item() == pytest.approx(0.448)
    assert state.scale_inv("l/input").item() == pytest.approx(1 / 0.448)


def test_delayed_hybrid_formats_and_margin():
    state = DelayedScalingState(DelayedScaling(margin=1, amax_history_len=4))
    state.quantize("l/input", t(2.0))
    state.quantize("l/weight", t(2.0))
    state.quantize("l/grad_output", t(2.0))
    assert state.format("l/grad_output") is E5M2 and state.format("l/weight") is E4M3
    state.step()
    assert state.scales.tolist() == [112.0, 112.0, 14336.0]  # (max/2)/2^1
    with pytest.raises(ValueError, match="role"):
        state.register("l/activation")


def test_delayed_zero_amax_step_neither_rolls_nor_changes_scale():
    state = DelayedScalingState(DelayedScaling(fp8_format="E4M3", amax_history_len=2))
    state.quantize("a/input", t(4.0))
    state.quantize("b/input", t(4.0))
    state.step()
    state.quantize("a/input", t(1.0))  # b unused this step
    state.step()
    assert state.amax_history.tolist() == [[0.0, 0.0], [1.0, 4.0]]
    assert state.scales.tolist() == [112.0, 112.0]  # a: max(4, 1)


def test_delayed_inf_amax_freezes_scale_until_evicted():
    state = DelayedScalingState(DelayedScaling(fp8_format="E4M3", amax_history_len=2))
    seq = []
    for a in [2.0, INF, 1.0, 1.0]:
        out = state.quantize("l/input", t(a, 0.5))
        state.step()
        seq.append(state.scale("l/input").item())
    assert out[0].item() == 1.0
    assert seq == [224.0, 224.0, 224.0, 448.0]  # Inf in the window keeps the old scale


def test_reduce_fn_max_semantics():
    others = t(8.0, 0.5, 0.0)  # another rank's amaxes for the same three tensors
    calls = []

    def fake_all_reduce_max(buf):
        calls.append(buf.clone())
        torch.maximum(buf, others, out=buf)

    state = DelayedScalingState(DelayedScaling(fp8_format="E4M3"), names=["a/input", "b/input", "c/input"])
    for name, a in zip(state.names, (1.0, 2.0, 0.0)):
        state.quantize(name, t(a))
    state.step(fake_all_reduce_max)
    assert len(calls) == 1 and calls[0].tolist() == [1.0, 2.0, 0.0]
    assert state.scales.tolist() == [56.0, 224.0, 1.0]  # 448/8, 448/2, unused everywhere -> 1.0
    assert state.amax_history[-1].tolist() == [8.0, 2.0, 0.0]

    no_reduce = DelayedScalingState(DelayedScaling(reduce_amax=False))
    no_reduce.quantize("a/input", t(1.0))
    no_reduce.step(fake_all_reduce_max)
    assert len(calls) == 1


def test_delayed_many_tensors_vectorised_matches_per_tensor_rule():
    gen = torch.Generator().manual_seed(3)
    recipe = DelayedScaling(amax_history_len=5, margin=1)
    names = [f"blocks.{i // 3}.mlp/{('input', 'weight', 'grad_output')[i % 3]}" for i in range(300)]
    state = DelayedScalingState(recipe)
    amaxes = torch.rand(7, 300, generator=gen) * 10
    amaxes[2, ::7] = 0.0  # some tensors unused in step 2
    for step in range(7):
        for i, name in enumerate(names):
            if amaxes[step, i] > 0:
                state.record_amax(name, amaxes[step, i])
            else:
                state.register(name)
        state.step()
    for i, name in enumerate(names):
        used = amaxes[:, i][amaxes[:, i] > 0]
        want = compute_scale(used[-5:].max(), state.format(name), margin=1)
        assert state.scale(name).item() == want.item(), name


def test_state_dict_round_trip():
    recipe = DelayedScaling(amax_history_len=3)
    a = DelayedScalingState(recipe)
    for v in (1.0, 3.0):
        a.quantize("l/input", t(v))
        a.quantize("l/grad_output", t(v * 100))
        a.step()
    b = DelayedScalingState(recipe)
    b.load_state_dict(a.state_dict())
    assert b.names == a.names and torch.equal(b.amax_history, a.amax_history)
    assert torch.equal(b.scales, a.scales) and b.num_steps == 2
    with pytest.raises(ValueError, match="amax_history_len"):
        DelayedScalingState(DelayedScaling(amax_history_len=4)).load_state_dict(a.state_dict())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fp8_format": "E5M2"},
        {"margin": -1},
        {"amax_history_len": 0},
        {"amax_compute_algo": "mean"},
    ],
)
def test_delayed_recipe_validation(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        DelayedScaling(**kwargs)


def test_power_of_2_rounding_is_a_bit_mask_where_torchao_log2_rounds_up():
    """Just below 2^k, torchao's FP32 ``exp2(floor(log2 s))`` returns 2^k; TE's bit mask (ours) 2^(k-1)."""
    from recipes.fp8.scaling import round_scale_down_to_power_of_2

    ao = pytest.importorskip("torchao.float8.float8_utils", reason="torchao is a dev dependency")
    below = torch.tensor([2.0**k * (1 - 2.0**-24) for k in (3, 10, 20, -5)])
    ours = round_scale_down_to_power_of_2(below)
    assert torch.equal(ours, torch.tensor([2.0**k / 2 for k in (3, 10, 20, -5)]))
    theirs = ao._round_scale_down_to_power_of_2(below)
    assert torch.equal(theirs[:3], torch.tensor([2.0**3, 2.0**10, 2.0**20]))  # FP32 log2 rounds to k
    exact = torch.tensor([2.0**k for k in (-3, 0, 7)]) * torch.tensor([1.0, 1.5, 1.9])
    assert torch.equal(round_scale_down_to_power_of_2(exact), ao._round_scale_down_to_power_of_2(exact))
