"""Independent reference: ml_dtypes' NumPy float8/float6/float4 and E8M0 dtypes.

What is compared, and why: ml_dtypes (the JAX/XLA dtype library, no torch, no
lowbit code) implements each OCP element format as a NumPy dtype with a
float32 -> format cast that rounds to nearest, ties to even, and decodes every
bit pattern. So it checks, for every MX float element format and both FP8
formats, lowbit's

* format constants (``recipes.mx.formats.FORMATS``, ``recipes.fp8.formats``) and the value of
  every element code (``element_values``) and every E8M0 byte (``decode_mx``);
* element rounding (``recipes.mx.core.round_elements``, ``nearest_even``) on every grid value,
  every exact tie, one float32 ulp either side of each tie, values below half the smallest
  subnormal, and random values over all binades;
* saturation (values beyond ``max_norm``);
* the whole MX pipeline (``quantize_mx`` / ``encode_mx`` with the spec's ``floor`` scale rule):
  a NumPy transcription of OCP MX v1.0 §6.3 whose element cast and E8M0 scale are ml_dtypes';
* per-tensor FP8 (``cast_to_fp8`` codes, ``quantize_fp8`` values).

Semantic differences, each named where it is tested:

(M1) Overflow: ml_dtypes' cast to ``float8_e4m3fn`` gives NaN and to ``float8_e5m2`` gives
     +-Inf for values that round above the format's max (|v| > 464, resp. >= 61440, and
     +-Inf inputs); lowbit (MX and FP8) saturates to +-max. ml_dtypes' float6/float4 casts
     saturate like lowbit. The agreeing part is tested by clamping to +-max before the cast.
(M2) NaN: ml_dtypes casts NaN to -0.0 in the float6/float4 dtypes (they have no NaN);
     lowbit MX makes a block holding a NaN all NaN (E8M0 scale 0xFF), whatever the format.
(M3) E8M0 from a float: ml_dtypes' ``float8_e8m0fnu`` cast rounds a non-power of two to a
     nearby power (3 -> 4) and maps 0 and negatives to NaN (0xFF). lowbit never casts a
     value to E8M0: its scale is 2^se from the floor rule, and an all-zero block gets
     byte 0x00 (2^-127). Only powers of two are passed through ml_dtypes here.
(M4) Rounding modes: ml_dtypes casts only round to nearest even, so ``nearest_away``,
     ``toward_zero`` and ``stochastic`` are not compared here (tests/test_refs_gfloat.py
     compares them against gfloat).
(M5) MXINT8 has no ml_dtypes dtype; its rows of the pipeline test use NumPy's own
     ``np.rint`` (ties to even) and the symmetric clamp to +-127 (MX: -2.0 never produced).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes is a dev reference (pip install -e '.[dev]')")

from recipes.fp8.formats import FP8_FORMATS, cast_to_fp8, quantize_fp8  # noqa: E402
from recipes.mx import FORMATS, MXTensor, decode_mx, element_values, encode_mx, quantize_mx  # noqa: E402
from recipes.mx.core import round_elements  # noqa: E402

MLD = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}
FLOAT_FMTS = list(MLD)
E8M0 = ml_dtypes.float8_e8m0fnu


def bits32(a: np.ndarray | torch.Tensor) -> np.ndarray:
    """int32 bit patterns of float32 values, every NaN mapped to one pattern (-0.0 stays -0.0)."""
    f = np.array(a.numpy() if isinstance(a, torch.Tensor) else a, dtype=np.float32)
    f[np.isnan(f)] = np.nan
    return f.view(np.int32)


def assert_bitwise(ours, ref, what: str) -> None:
    b1, b2 = bits32(ours), bits32(ref)
    bad = b1 != b2
    if bad.any():
        o = np.asarray(ours, dtype=np.float32)[bad][:4]
        r = np.asarray(ref, dtype=np.float32)[bad][:4]
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} differ, e.g. lowbit {o} vs ml_dtypes {r}"
        )


def mld_round(v: np.ndarray, fmt: str, *, clamp: bool = True) -> np.ndarray:
    """ml_dtypes' RNE cast of float32 ``v`` to ``fmt`` and back; clamped first unless told (M1)."""
    m = FORMATS[fmt].max_norm
    v = np.asarray(v, dtype=np.float32)
    if clamp:
        v = np.clip(v, np.float32(-m), np.float32(m))
    return v.astype(MLD[fmt]).astype(np.float32)


def lowbit_round(v: np.ndarray, fmt: str) -> np.ndarray:
    """``round_elements`` (nearest_even) of already-scaled values: the element value r * q."""
    t = torch.from_numpy(np.array(v, dtype=np.float32))
    r, q = round_elements(t.clone(), fmt=FORMATS[fmt], rounding="nearest_even", sign_of=t, noise=None)
    return (r * q).numpy()


def grid(fmt: str) -> np.ndarray:
    """The finite non-negative values of ``fmt``, ascending (from ml_dtypes' decode of every code)."""
    vals = np.arange(2 ** FORMATS[fmt].bits, dtype=np.uint8).view(MLD[fmt]).astype(np.float64)
    return np.unique(vals[np.isfinite(vals) & (vals >= 0)])


def probe_values(fmt: str, seed: int = 0) -> np.ndarray:
    """Grid values, exact ties, ties +- 1 float32 ulp, tiny values and random values, both signs."""
    g = grid(fmt)
    mid = ((g[:-1] + g[1:]) / 2).astype(np.float32)  # exact: at most mbits + 2 significant bits
    f = FORMATS[fmt]
    tiny = np.float32(f.min_subnormal) * np.array([0.5, 0.25, 0.5 + 2.0**-20, 2.0**-30], dtype=np.float32)
    rng = np.random.default_rng(seed)
    lo, hi = f.emin - f.mbits - 4, f.emax + 1
    rand = (rng.uniform(1, 2, 4000) * 2.0 ** rng.integers(lo, hi, 4000)).astype(np.float32)
    above = np.array([f.max_norm * 1.01, 2.0 ** (f.emax + 1) * (1 - 2.0**-24), 1e30], dtype=np.float32)
    pos = np.concatenate(
        [
            g.astype(np.float32),
            mid,
            np.nextafter(mid, np.float32(np.inf)),
            np.nextafter(mid, np.float32(0)),
            tiny,
            rand,
            above,
        ]
    )
    return np.concatenate([pos, -pos])


# ---------------------------------------------------------------- format constants and code tables


@pytest.mark.parametrize("fmt", FLOAT_FMTS)
def test_format_constants(fmt: str):
    f, fi = FORMATS[fmt], ml_dtypes.finfo(MLD[fmt])
    assert (float(fi.max), float(fi.smallest_normal), float(fi.smallest_subnormal)) == (
        f.max_norm,
        f.min_normal,
        f.min_subnormal,
    )
    assert (fi.bits, fi.nmant, fi.nexp) == (f.bits, f.mbits, f.ebits)
    assert float(fi.max) == (2 - 2.0 ** -(f.mbits if fmt != "fp8_e4m3" else f.mbits - 1)) * 2.0**f.emax


@pytest.mark.parametrize("name", list(FP8_FORMATS))
def test_fp8_format_constants(name: str):
    f = FP8_FORMATS[name]
    fi = ml_dtypes.finfo(MLD[f.element])
    assert (float(fi.max), float(fi.smallest_normal), float(fi.smallest_subnormal)) == (
        f.max,
        f.min_normal,
        f.min_subnormal,
    )
    assert (fi.nexp, fi.nmant) == (f.exponent_bits, f.mantissa_bits)
    assert f.has_inf == bool(np.isinf(np.array([np.inf], np.float32).astype(MLD[f.element])[0]))


@pytest.mark.parametrize("fmt", FLOAT_FMTS)
def test_element_code_table(fmt: str):
    """Every code's value (signed zeros, subnormals, OFP8 NaN/Inf codes) as ml_dtypes decodes it."""
    codes = np.arange(2 ** FORMATS[fmt].bits, dtype=np.uint8)
    assert_bitwise(element_values(fmt), codes.view(MLD[fmt]).astype(np.float32), f"{fmt} code table")


def test_e8m0_every_byte_decodes_as_ml_dtypes():
    """decode_mx of one block per E8M0 byte (elements 1.0): 2^(b-127) for b < 255, NaN for 0xFF."""
    one = int(np.array([1.0], np.float32).astype(MLD["fp8_e4m3"]).view(np.uint8)[0])  # 0x38
    mx = MXTensor(
        codes=torch.full((256, 32), one, dtype=torch.uint8),
        scales_e8m0=torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(256, 1),
        fmt=FORMATS["fp8_e4m3"],
        block_size=32,
        axis=1,
        shape=(256, 32),
    )
    ref = np.arange(256, dtype=np.uint8).view(E8M0).astype(np.float32)
    assert np.isnan(ref[255]) and ref[0] == np.float32(2.0**-127)  # float32 subnormal, exact
    assert_bitwise(decode_mx(mx), np.repeat(ref[:, None], 32, axis=1), "E8M0 decode")


def test_difference_m3_e8m0_cast_of_non_powers_and_zero():
    """(M3) ml_dtypes casts 0 to NaN and rounds 3 to 4; lowbit's all-zero block has byte 0 = 2^-127."""
    cast = np.array([0.0, 3.0, 2.0**-127, 2.0**127], dtype=np.float32).astype(E8M0).view(np.uint8)
    assert cast.tolist() == [0xFF, 129, 0, 254]
    for fmt in FORMATS:
        assert encode_mx(torch.zeros(1, 32), fmt).scales_e8m0.item() == 0


# ---------------------------------------------------------------- element rounding and saturation


@pytest.mark.parametrize("fmt", FLOAT_FMTS)
def test_round_elements_rne_equals_ml_dtypes_cast(fmt: str):
    """All probes, clamped to +-max first (M1): bitwise, signed zeros included."""
    v = probe_values(fmt)
    assert_bitwise(lowbit_round(v, fmt), mld_round(v, fmt), f"{fmt} rounding")


@pytest.mark.parametrize("fmt", FLOAT_FMTS)
def test_ties_round_to_even(fmt: str):
    """Every exact midpoint goes to the neighbour with the even code (ml_dtypes' rule and lowbit's)."""
    g = grid(fmt)
    mid = ((g[:-1] + g[1:]) / 2).astype(np.float32)
    ours = lowbit_round(mid, fmt)
    codes = ours.astype(MLD[fmt]).view(np.uint8)
    assert np.all(codes % 2 == 0), fmt
    assert np.all((ours == g[:-1]) | (ours == g[1:]))
    assert_bitwise(ours, mld_round(mid, fmt, clamp=False), f"{fmt} ties")


@pytest.mark.parametrize("fmt", FLOAT_FMTS)
def test_difference_m1_overflow(fmt: str):
    """(M1) Beyond max lowbit saturates to +-max; ml_dtypes gives NaN (e4m3fn), Inf (e5m2), or
    saturates too (fp6/fp4, no Inf/NaN in the format).

    The tie ``max + step/2`` (464 for e4m3, 61440 for e5m2): ml_dtypes rounds it to even, which is
    448 for e4m3 (code 0x7E; 0x7F is NaN) but Inf for e5m2 (0x7C); lowbit gives max in both.
    """
    f = FORMATS[fmt]
    g = grid(fmt)
    tie = np.float32(f.max_norm + (g[-1] - g[-2]) / 2)
    below_tie = np.nextafter(tie, np.float32(0))
    above = np.array(
        [np.nextafter(tie, np.float32(np.inf)), 2.0 ** (f.emax + 1) * (1 - 2.0**-24), 1e30, np.inf]
    )
    above = np.concatenate([above, -above]).astype(np.float32)
    ties = np.array([tie, -tie], np.float32)
    sign = np.sign(above)
    assert np.array_equal(lowbit_round(above, fmt), sign * np.float32(f.max_norm))
    assert np.array_equal(lowbit_round(ties, fmt), np.sign(ties) * np.float32(f.max_norm))
    raw, raw_ties = mld_round(above, fmt, clamp=False), mld_round(ties, fmt, clamp=False)
    if fmt == "fp8_e4m3":
        assert np.isnan(raw).all()
        assert_bitwise(lowbit_round(ties, fmt), raw_ties, "e4m3 tie above max")
    elif fmt == "fp8_e5m2":
        assert np.array_equal(raw, sign * np.inf) and np.array_equal(raw_ties, np.sign(ties) * np.inf)
    else:
        assert_bitwise(lowbit_round(above, fmt), raw, f"{fmt} saturation")
        assert_bitwise(lowbit_round(ties, fmt), raw_ties, f"{fmt} tie above max")
    below = np.array([below_tie, -below_tie], np.float32)  # rounds to +-max in both, no clamp needed
    assert_bitwise(lowbit_round(below, fmt), mld_round(below, fmt, clamp=False), f"{fmt} below tie")
    assert np.array_equal(lowbit_round(below, fmt), np.sign(below) * np.float32(f.max_norm))


# ---------------------------------------------------------------- whole MX pipeline (floor rule)


def mx_reference(x: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """OCP MX v1.0 §6.3 on float32 rows of 32-element blocks, with ml_dtypes' casts.

    Returns (dequantized float32, E8M0 bytes, element codes or None for int8).
    """
    f = FORMATS[fmt]
    xb = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    _, e = np.frexp(amax)  # amax = m 2^e, m in [0.5, 1): floor(log2 amax) = e - 1, exact
    se = np.maximum(np.where(amax > 0, e - 1, -127) - f.emax, -127)
    scale = np.ldexp(np.float32(1), se).astype(np.float32)  # exact powers of two (2^-127 subnormal)
    s8 = scale.astype(E8M0)
    assert np.array_equal(s8.astype(np.float32), scale)  # a power of two survives E8M0 exactly (M3)
    v = (xb / scale).astype(np.float32)  # exact: power-of-two divisor
    v = np.clip(v, np.float32(-f.max_norm), np.float32(f.max_norm))
    if f.is_int:  # (M5) no ml_dtypes MXINT8 dtype: NumPy RNE on the 2^-6 grid, symmetric range
        w = (np.rint(v * 64) / 64).astype(np.float32)
        codes = None
    else:
        w8 = v.astype(MLD[fmt])
        w, codes = w8.astype(np.float32), w8.view(np.uint8).reshape(x.shape)
    y = (w * scale).astype(np.float32).reshape(x.shape)
    return y, s8.view(np.uint8).reshape(x.shape[0], -1), codes


def mx_data(fmt: str, seed: int) -> np.ndarray:
    """64 x 512 float32: blocks at magnitudes 2^-150 .. 2^100 (fp32-subnormal blocks, blocks with
    scale 2^-127, element-subnormal elements via heavy tails), saturating blocks, tie blocks."""
    f = FORMATS[fmt]
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((64, 16, 32))
    x = z * np.abs(z) ** 2  # heavy tails: wide range inside a block
    x = x * 2.0 ** rng.integers(-150, 101, (64, 16, 1))
    # saturating blocks: amax just below 2^(emax+1) times 2^k (X = 2^k, amax/X > max_norm)
    top = 2.0 ** (f.emax + 1) * (1 - 2.0 ** -rng.integers(6, 25, 16))
    x[0, :, 0] = top * 2.0 ** rng.integers(-100, 100, 16) * np.where(np.arange(16) % 2, -1.0, 1.0)
    # tie blocks: element 0 = 2^emax (X = 1 * 2^k), the rest exact midpoints of the grid * 2^k
    if f.is_int:
        mids = (np.arange(-127, 127) + 0.5) / 64
    else:
        g = grid(fmt)
        mids = (g[:-1] + g[1:]) / 2
        mids = np.concatenate([mids, -mids])
    for row in (1, 2):
        for b in range(16):
            x[row, b] = rng.choice(mids, 32)
            x[row, b, 0] = 2.0**f.emax
    x[1:3] *= 2.0 ** rng.integers(-120, 100, (2, 16, 1))
    return x.astype(np.float32).reshape(64, 512)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("seed", [0, 1])
def test_quantize_mx_floor_equals_ml_dtypes_transcription(fmt: str, seed: int):
    x = mx_data(fmt, seed)
    y, scales, codes = mx_reference(x, fmt)
    xt = torch.from_numpy(x)
    assert_bitwise(quantize_mx(xt, fmt), y, f"{fmt} quantize_mx")
    mx = encode_mx(xt, fmt)
    assert np.array_equal(mx.scales_e8m0.numpy(), scales), f"{fmt} E8M0 bytes"
    if codes is not None:
        assert np.array_equal(mx.codes.numpy(), codes), f"{fmt} element codes"
    if FORMATS[fmt].is_int:  # MXINT8 has no -0: decode_mx gives +0 where quantize_mx kept -0
        y = y + np.float32(0.0)
    assert_bitwise(decode_mx(mx), y, f"{fmt} decode_mx")


def test_difference_m2_nan_block():
    """(M2) ml_dtypes casts NaN to -0.0 in fp6/fp4 (no NaN there); lowbit's NaN block is all NaN."""
    x = torch.ones(1, 32)
    x[0, 5] = float("nan")
    for fmt in FORMATS:
        assert quantize_mx(x, fmt).isnan().all(), fmt
        assert encode_mx(x, fmt).scales_e8m0.item() == 0xFF
    for fmt in ("fp6_e3m2", "fp6_e2m3", "fp4_e2m1"):
        assert bits32(mld_round(np.array([np.nan]), fmt, clamp=False)).tolist() == [-(2**31)]
    for fmt in ("fp8_e4m3", "fp8_e5m2"):
        assert np.isnan(mld_round(np.array([np.nan]), fmt, clamp=False)).all()


# ---------------------------------------------------------------- per-tensor FP8


def fp8_data(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(8192)
    x = z * np.abs(z) ** 3 * 2.0 ** rng.integers(-12, 12, 8192)
    x[:6] = [0.0, -0.0, 1e-30, -1e-30, 1e6, -1e6]
    return x.astype(np.float32)


@pytest.mark.parametrize("name", list(FP8_FORMATS))
@pytest.mark.parametrize("scale", [1.0, 2.0**-7, 2.0**9, 0.3, 1 / 448 * 17.3])
def test_fp8_cast_and_quantize_equal_ml_dtypes(name: str, scale: float):
    """cast_to_fp8 codes and quantize_fp8 values: clamp(x*s) (M1) cast by ml_dtypes, then / s."""
    f = FP8_FORMATS[name]
    x = fp8_data(7)
    s = np.float32(scale)
    y = np.clip(x * s, np.float32(-f.max), np.float32(f.max))
    q = y.astype(MLD[f.element])
    ref_codes = q.view(np.uint8)
    ref_values = (q.astype(np.float32) / s).astype(np.float32)
    xt = torch.from_numpy(x)
    codes, scale_inv = cast_to_fp8(xt, f, float(s))
    assert np.array_equal(codes.view(torch.uint8).numpy(), ref_codes), name
    assert scale_inv.item() == np.float32(1) / s
    assert_bitwise(quantize_fp8(xt, f, float(s)), ref_values, f"{name} quantize_fp8")


@pytest.mark.parametrize("name", list(FP8_FORMATS))
def test_fp8_difference_m1_inf_and_overflow(name: str):
    """(M1) lowbit FP8 saturates +-Inf and overflow to +-max; ml_dtypes' cast gives NaN / Inf."""
    f = FP8_FORMATS[name]
    x = np.array([np.inf, -np.inf, 1e10, -1e10, np.nan], np.float32)
    ours = quantize_fp8(torch.from_numpy(x), f, 1.0).numpy()
    assert ours[:4].tolist() == [f.max, -f.max, f.max, -f.max] and np.isnan(ours[4])
    raw = x.astype(MLD[f.element]).astype(np.float32)
    if f.has_inf:
        assert raw[:4].tolist() == [np.inf, -np.inf, np.inf, -np.inf]
    else:
        assert np.isnan(raw[:4]).all()
    assert np.isnan(raw[4])
