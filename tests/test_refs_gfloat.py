"""Independent reference: gfloat (Graphcore's format library) for OCP MX block quantization.

What is compared, and why: gfloat implements the OCP MX v1.0 block formats
(``gfloat.formats.format_info_mx*``: k = 32 elements, E8M0 scale) in plain
Python/NumPy float64, from the format descriptions alone (no torch, no lowbit
code). Its ``quantize_block`` with ``compute_scale_amax`` is the spec's §6.3
rule: ``X = 2^clip(floor(log2 amax) - emax_elem, -127, 127)`` (an all-zero block
gets 2^-127), elements ``V / X`` rounded to the element format and saturated to
+-max. That is lowbit's ``scale_rule="floor"``, so ``quantize_mx`` (block 32,
last axis) is compared bit for bit, for every MX element format, on:

* randomized blocks at magnitudes 2^-150 .. 2^100 (fp32-subnormal blocks, blocks clamped to the
  2^-127 scale, elements in the element format's subnormal range via heavy tails);
* blocks whose amax lies just below 2^(emax+1), so elements saturate;
* blocks of exact ties (midpoints of the element grid at X = 2^k);
* the rounding modes both have: ``nearest_even`` = ``RoundMode.TiesToEven``,
  ``nearest_away`` = ``TiesToAway``, ``toward_zero`` = ``TowardZero``, and ``stochastic``
  against ``RoundMode.Stochastic`` with lowbit's own noise as gfloat's 24 random bits.

Both gfloat paths are used: the scalar ``quantize_block`` / ``encode_block`` /
``decode_block`` on a subset of blocks (it costs ~5 ms a block), and the
vectorized ``round_ndarray`` with ``compute_scale_amax`` per block on all of them.
The codes are compared too: ``encode_mx``'s element codes and E8M0 bytes against
``encode_block``'s, lowbit's ``decode_mx`` of gfloat's codes against ``decode_block``,
and ``element_values`` against ``decode_float`` for every code.

Semantic differences, each named where it is tested:

(G1) MXINT8 range: gfloat's ``ocp_int8`` is two's complement with min -2.0 (code 0x80), so an
     element V/X in [-2, -127.5/64] rounds (ties to even) to -2.0; lowbit's MXINT8 is
     symmetric (as microxcaling) and clamps to -127/64. Elsewhere they agree.
(G2) MXINT8 zero: gfloat's int8 has no -0 (``has_nz=False``), so a negative element that
     rounds to zero gives +0.0; ``quantize_mx`` keeps -0.0 (``encode_mx``'s int8 code is 0
     either way, which agrees with gfloat). Values are compared with -0.0 == +0.0 for int8.
(G3) NaN in a block: for fp8 elements gfloat gives an all-NaN block with scale 0xFF, as lowbit
     does; for fp6/fp4/int8 (no NaN in the element format) gfloat raises ValueError, while
     lowbit gives an all-NaN block with scale 0xFF.
(G4) +-Inf in a block: gfloat clips the scale exponent to 127 and saturates the Inf element to
     +-max * 2^127 (the other elements mostly flush to zero); lowbit makes the block all NaN
     (scale 0xFF), as microxcaling does. The spec leaves Inf inputs to the implementation.
(G5) Stochastic rounding of elements far below the smallest subnormal: gfloat's ``Stochastic``
     first rounds the fraction ``delta`` to 24 bits (ties to even), lowbit compares the exact
     ``delta`` with its noise (``noise < delta``). They agree whenever ``delta`` is a multiple of
     2^-24, which holds for every element with |V/X| >= half the smallest subnormal (a float32
     has 24 significant bits); randomized stochastic data keeps to that range, and one
     hand-made element below it shows the difference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

gfloat = pytest.importorskip("gfloat", reason="gfloat is a dev reference (pip install -e '.[dev]')")
from gfloat import (  # noqa: E402
    RoundMode,
    compute_scale_amax,
    decode_block,
    decode_float,
    encode_block,
    quantize_block,
    round_ndarray,
)
from gfloat import formats as gf  # noqa: E402

from recipes.mx import FORMATS, MXTensor, decode_mx, element_values, encode_mx, quantize_mx  # noqa: E402
from recipes.mx.core import round_elements  # noqa: E402
from recipes.mx.quantize import uniform_noise  # noqa: E402

GF = {
    "fp8_e4m3": gf.format_info_mxfp8_e4m3,
    "fp8_e5m2": gf.format_info_mxfp8_e5m2,
    "fp6_e3m2": gf.format_info_mxfp6_e3m2,
    "fp6_e2m3": gf.format_info_mxfp6_e2m3,
    "fp4_e2m1": gf.format_info_mxfp4_e2m1,
    "int8": gf.format_info_mxint8,
}
ROUND = {
    "nearest_even": RoundMode.TiesToEven,
    "nearest_away": RoundMode.TiesToAway,
    "toward_zero": RoundMode.TowardZero,
}
SR_BITS = 24  # torch.rand float32 noise is a multiple of 2^-24


def bits32(a: np.ndarray | torch.Tensor, *, unsigned_zero: bool = False) -> np.ndarray:
    """int32 bit patterns, NaNs mapped to one pattern; -0.0 -> +0.0 if ``unsigned_zero`` (G2)."""
    f = np.array(a.numpy() if isinstance(a, torch.Tensor) else a, dtype=np.float32)
    f[np.isnan(f)] = np.nan
    if unsigned_zero:
        f = f + np.float32(0.0)
    return f.view(np.int32)


def assert_bitwise(ours, ref, what: str, *, unsigned_zero: bool = False) -> None:
    b1, b2 = bits32(ours, unsigned_zero=unsigned_zero), bits32(ref, unsigned_zero=unsigned_zero)
    bad = b1 != b2
    if bad.any():
        o = np.asarray(ours, dtype=np.float32)[bad][:4]
        r = np.asarray(ref, dtype=np.float32)[bad][:4]
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} differ, e.g. lowbit {o} vs gfloat {r}")


def grid(fmt: str) -> np.ndarray:
    """Finite non-negative element values (from gfloat's decode of every code), ascending."""
    fi = GF[fmt].etype
    vals = np.array([decode_float(fi, c).fval for c in range(2**fi.k)], dtype=np.float64)
    return np.unique(vals[np.isfinite(vals) & (vals >= 0)])


def mx_data(fmt: str, seed: int, rows: int = 32) -> np.ndarray:
    """rows x 512 float32 (16 blocks a row). Row 0: saturating blocks; rows 1-2: tie blocks;
    the rest: heavy-tailed blocks at 2^-150 .. 2^100."""
    f = FORMATS[fmt]
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((rows, 16, 32))
    x = z * np.abs(z) ** 2 * 2.0 ** rng.integers(-150, 101, (rows, 16, 1))
    top = 2.0 ** (f.emax + 1) * (1 - 2.0 ** -rng.integers(6, 25, 16))  # amax / X > max_norm
    x[0, :, 0] = top * 2.0 ** rng.integers(-100, 100, 16) * np.where(np.arange(16) % 2, -1.0, 1.0)
    g = grid(fmt)
    mids = (g[:-1] + g[1:]) / 2  # exact ties of the element grid (int8: (k + 1/2) / 64)
    mids = np.concatenate([mids, -mids])
    for row in (1, 2):
        x[row] = rng.choice(mids, (16, 32))
        x[row, :, 0] = 2.0**f.emax  # X = 2^0 before the 2^k below
    x[1:3] *= 2.0 ** rng.integers(-120, 100, (2, 16, 1))
    return x.astype(np.float32).reshape(rows, 512)


def gf_block_scales(x: np.ndarray, fmt: str) -> np.ndarray:
    """gfloat's ``compute_scale_amax`` for every 32-element block: float64, shape (rows, nb, 1)."""
    xb = x.astype(np.float64).reshape(x.shape[0], -1, 32)
    emax = GF[fmt].etype.emax
    return np.array([[[compute_scale_amax(emax, b)] for b in row] for row in xb])


def gf_quantize_nd(x: np.ndarray, fmt: str, rnd: RoundMode, srbits: np.ndarray | None = None) -> np.ndarray:
    """Vectorized gfloat: per-block scale, ``round_ndarray`` (saturating), times the scale."""
    xb = x.astype(np.float64).reshape(x.shape[0], -1, 32)
    scale = gf_block_scales(x, fmt)
    kw = {} if srbits is None else dict(srbits=srbits.reshape(xb.shape), srnumbits=SR_BITS)
    w = round_ndarray(GF[fmt].etype, xb / scale, rnd, sat=True, **kw)
    return (w * scale).astype(np.float32).reshape(x.shape)  # exact: every value fits float32


def gf_quantize_blocks(x: np.ndarray, fmt: str, rnd: RoundMode) -> np.ndarray:
    """Scalar gfloat: ``quantize_block`` on each 32-element block."""
    out = [quantize_block(GF[fmt], b.astype(np.float64), compute_scale_amax, rnd) for b in x.reshape(-1, 32)]
    return np.stack(out).astype(np.float32).reshape(x.shape)


def compare(ours: torch.Tensor, ref: np.ndarray, fmt: str, what: str, x: np.ndarray) -> None:
    """Bitwise. For int8, (G1) and (G2): where gfloat gives -2.0 * X (X = gfloat's block scale of
    ``x``) lowbit must give -127/64 * X, and -0.0 == +0.0."""
    ours_np = ours.numpy()
    if FORMATS[fmt].is_int:
        scale = np.repeat(gf_block_scales(x, fmt), 32, axis=-1).reshape(x.shape)
        minus_two = ref == (-2 * scale).astype(np.float32)
        lowbit_there = (np.float32(-127 / 64) * scale).astype(np.float32)
        assert np.array_equal(ours_np[minus_two], lowbit_there[minus_two]), f"{what}: (G1)"
        ref = np.where(minus_two, lowbit_there, ref)
    assert_bitwise(ours_np, ref, what, unsigned_zero=FORMATS[fmt].is_int)


# ---------------------------------------------------------------- element codes


@pytest.mark.parametrize("fmt", list(GF))
def test_element_values_equal_decode_float(fmt: str):
    fi = GF[fmt].etype
    ref = np.array([decode_float(fi, c).fval for c in range(2**fi.k)], dtype=np.float32)
    assert_bitwise(element_values(fmt), ref, f"{fmt} code table")


def test_e8m0_decode_float():
    ref = np.array([decode_float(gf.format_info_ocp_e8m0, c).fval for c in range(256)], dtype=np.float32)
    assert np.isnan(ref[255]) and np.array_equal(ref[:255], np.ldexp(np.float32(1), np.arange(-127, 128)))


# ---------------------------------------------------------------- quantize_mx vs gfloat


@pytest.mark.parametrize("fmt", list(GF))
@pytest.mark.parametrize("rounding", list(ROUND))
def test_quantize_mx_equals_gfloat_quantize_block(fmt: str, rounding: str):
    """Scalar path: 4 saturating, 4 tie and 8 random blocks, through ``quantize_block``."""
    x = mx_data(fmt, 3)
    sub = np.ascontiguousarray(np.concatenate([x[0, :128], x[1, :128], x[5, :256]]).reshape(1, 512))
    ref = gf_quantize_blocks(sub, fmt, ROUND[rounding])
    ours = quantize_mx(torch.from_numpy(sub), fmt, rounding=rounding, scale_rule="floor")
    compare(ours, ref, fmt, f"{fmt} {rounding} quantize_block", sub)


@pytest.mark.parametrize("fmt", list(GF))
@pytest.mark.parametrize("rounding", list(ROUND))
@pytest.mark.parametrize("seed", [0, 1])
def test_quantize_mx_equals_gfloat_round_ndarray(fmt: str, rounding: str, seed: int):
    """Vectorized path on all 32 x 16 blocks."""
    x = mx_data(fmt, seed)
    ref = gf_quantize_nd(x, fmt, ROUND[rounding])
    ours = quantize_mx(torch.from_numpy(x), fmt, rounding=rounding, scale_rule="floor")
    compare(ours, ref, fmt, f"{fmt} {rounding} round_ndarray", x)


@pytest.mark.parametrize("fmt", list(GF))
def test_encode_mx_codes_equal_gfloat_encode_block(fmt: str):
    """Element codes and E8M0 bytes; then lowbit's decoder on gfloat's codes = decode_block."""
    x = mx_data(fmt, 5)
    blocks = np.ascontiguousarray(np.concatenate([x[0, :128], x[1, :128], x[7, :256]]).reshape(1, 512))
    mx = encode_mx(torch.from_numpy(blocks), fmt)
    gf_codes, gf_values = [], []
    for b, s in zip(blocks.reshape(-1, 32), gf_block_scales(blocks, fmt).reshape(-1)):
        enc = list(encode_block(GF[fmt], float(s), b.astype(np.float64) / s, RoundMode.TiesToEven))
        gf_codes.append(enc)
        gf_values.append(np.fromiter(decode_block(GF[fmt], enc), float))
    gf_codes_np = np.array(gf_codes, dtype=np.uint8)  # (16, 33): scale byte, 32 element codes
    assert np.array_equal(mx.scales_e8m0.numpy().reshape(-1), gf_codes_np[:, 0]), f"{fmt} E8M0 bytes"
    elem = gf_codes_np[:, 1:].reshape(1, 512)
    if FORMATS[fmt].is_int:  # (G1): gfloat's 0x80 (-2.0) is lowbit's 0x81 (-127/64)
        assert np.array_equal(mx.codes.numpy()[elem == 0x80], np.full(int((elem == 0x80).sum()), 0x81))
        elem = np.where(elem == 0x80, 0x81, elem)
    assert np.array_equal(mx.codes.numpy(), elem), f"{fmt} element codes"
    theirs = MXTensor(
        codes=torch.from_numpy(gf_codes_np[:, 1:].reshape(1, 512).copy()),
        scales_e8m0=torch.from_numpy(gf_codes_np[:, 0].reshape(1, 16).copy()),
        fmt=FORMATS[fmt],
        block_size=32,
        axis=1,
        shape=(1, 512),
    )
    assert_bitwise(decode_mx(theirs), np.concatenate(gf_values).reshape(1, 512), f"{fmt} decode_mx")


# ---------------------------------------------------------------- stochastic rounding


@pytest.mark.parametrize("fmt", list(GF))
def test_stochastic_equals_gfloat_stochastic(fmt: str):
    """lowbit's noise n * 2^-24 is gfloat's ``srbits = 2^24 - 1 - n`` (lowbit rounds up iff
    n < delta * 2^24; gfloat iff delta * 2^24 + srbits >= 2^24). Elements below half the
    smallest subnormal are set to zero (G5)."""
    f = FORMATS[fmt]
    x = mx_data(fmt, 9, rows=16)
    scale = np.repeat(gf_block_scales(x, fmt), 32, axis=-1).reshape(x.shape)
    half_sub = f.min_subnormal / 2 if not f.is_int else 2.0**-7
    x = np.where(np.abs(x / scale) < half_sub, np.float32(0), x).astype(np.float32)
    xt = torch.from_numpy(x)
    noise = uniform_noise(xt, generator=None, seed=123).numpy()
    n = (noise.astype(np.float64) * 2**SR_BITS).astype(np.int64)
    assert np.array_equal(n.astype(np.float64) / 2**SR_BITS, noise)
    ref = gf_quantize_nd(x, fmt, RoundMode.Stochastic, srbits=2**SR_BITS - 1 - n)
    ours = quantize_mx(xt, fmt, rounding="stochastic", seed=123)
    compare(ours, ref, fmt, f"{fmt} stochastic", x)


def test_difference_g5_stochastic_far_below_the_grid():
    """(G5) e4m3 element 2^-35 (quantum 2^-9, delta = 2^-26) with noise 0: lowbit rounds up
    (0 < 2^-26) to 2^-9; gfloat rounds delta to 24 bits (0), so never rounds up."""
    v = torch.tensor([2.0**-35])
    r, q = round_elements(
        v.clone(), fmt=FORMATS["fp8_e4m3"], rounding="stochastic", sign_of=v, noise=torch.zeros(1)
    )
    assert (r * q).item() == 2.0**-9
    theirs = round_ndarray(
        gf.format_info_ocp_e4m3,
        np.array([2.0**-35]),
        RoundMode.Stochastic,
        sat=True,
        srbits=np.array([2**SR_BITS - 1]),
        srnumbits=SR_BITS,
    )
    assert theirs.tolist() == [0.0]


# ---------------------------------------------------------------- named differences


def test_difference_g1_g2_int8_minus_two_and_signed_zero():
    """(G1) V/X in [-2, -127.5/64]: gfloat -2.0 (code 0x80), lowbit -127/64 (0x81).
    (G2) -2^-9: gfloat +0.0, quantize_mx -0.0 (encode_mx code 0 for both)."""
    vals = np.zeros(32)
    vals[:5] = [1.0, -1.9921875, -1.999, -127.25 / 64, -(2.0**-9)]  # amax 1.999: X = 2^0
    theirs = quantize_block(GF["int8"], vals, compute_scale_amax, RoundMode.TiesToEven)
    assert theirs[:5].tolist() == [1.0, -2.0, -2.0, -127 / 64, 0.0]
    assert math.copysign(1.0, theirs[4]) == 1.0
    x = torch.from_numpy(vals.astype(np.float32)).reshape(1, 32)
    ours = quantize_mx(x, "int8")[0]
    assert ours[:5].tolist() == [1.0, -127 / 64, -127 / 64, -127 / 64, 0.0]
    assert math.copysign(1.0, ours[4].item()) == -1.0
    enc = list(encode_block(GF["int8"], 1.0, vals, RoundMode.TiesToEven))
    assert enc[2:6] == [0x80, 0x80, 0x81, 0x00]
    assert encode_mx(x, "int8").codes[0, 1:5].tolist() == [0x81, 0x81, 0x81, 0x00]


@pytest.mark.parametrize("fmt", list(GF))
def test_difference_g3_nan_block(fmt: str):
    """(G3) A NaN in a block: lowbit all NaN, scale 0xFF, for every format; gfloat the same for
    fp8 and a ValueError ("No NaN in format") for fp6/fp4/int8."""
    vals = np.ones(32)
    vals[4] = np.nan
    x = torch.from_numpy(vals.astype(np.float32)).reshape(1, 32)
    assert quantize_mx(x, fmt).isnan().all() and encode_mx(x, fmt).scales_e8m0.item() == 0xFF
    if fmt.startswith("fp8"):
        assert np.isnan(quantize_block(GF[fmt], vals, compute_scale_amax)).all()
        enc = list(encode_block(GF[fmt], compute_scale_amax(GF[fmt].etype.emax, vals), vals))
        assert enc[0] == 0xFF
    else:
        with pytest.raises(ValueError, match="No NaN"):
            quantize_block(GF[fmt], vals, compute_scale_amax)


@pytest.mark.parametrize("fmt", list(GF))
def test_difference_g4_inf_block(fmt: str):
    """(G4) +-Inf in a block: gfloat scale 2^127 and the Inf saturated to +-max * 2^127; lowbit NaN."""
    vals = np.ones(32)
    vals[0], vals[1] = np.inf, -np.inf
    theirs = quantize_block(GF[fmt], vals, compute_scale_amax)
    m = FORMATS[fmt].max_norm * 2.0**127
    lowest = -2.0 * 2.0**127 if FORMATS[fmt].is_int else -m  # (G1): int8 saturates down to -2.0 * X
    assert theirs[0] == m and theirs[1] == lowest and np.all(theirs[2:] == 0)
    x = torch.from_numpy(vals.astype(np.float32)).reshape(1, 32)
    assert quantize_mx(x, fmt).isnan().all() and encode_mx(x, fmt).scales_e8m0.item() == 0xFF
