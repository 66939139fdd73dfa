"""quantize_mx against the float64 step-by-step reference; encode/decode round trips.

Compile is OFF here except in ``test_compiled_matches_eager_bitwise__only_compile_test``
(the single torch.compile test of the MX library, ~30-60 s on 2 CPU cores).
"""

from __future__ import annotations

import pytest
import torch

from recipes.mx import (
    FORMATS,
    ROUNDINGS,
    SCALE_RULES,
    decode_mx,
    encode_mx,
    quantize_mx,
    quantize_mx_compiled,
)
from recipes.mx.reference import quantize_mx_reference

DETERMINISTIC = [r for r in ROUNDINGS if r != "stochastic"]


def bits(t: torch.Tensor) -> torch.Tensor:
    """int32 view with every NaN mapped to one pattern."""
    t = t.float().clone()
    t[t.isnan()] = float("nan")
    return t.view(torch.int32)


def assert_bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    diff = bits(a) != bits(b)
    assert not diff.any(), f"{int(diff.sum())} differ: ours {a[diff][:4].tolist()} vs {b[diff][:4].tolist()}"


def mixed_data(seed: int = 0) -> torch.Tensor:
    """randn with a random 2^U(-40,40) per 32-block, a few zeros, fp32 subnormals and exact ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 96, generator=g)
    x *= (
        torch.exp2(torch.randint(-40, 41, (24, 3, 1), generator=g).float())
        .repeat_interleave(32, 1)
        .view(24, 96)
    )
    x[0, :5] = torch.tensor([0.0, -0.0, 1e-40, -3e-42, 2.5])
    x[1, :32] = torch.arange(32) * 0.25 - 4  # many exact ties for every format
    x[2, :32] = 0.0
    return x


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("rounding", DETERMINISTIC)
def test_matches_float64_reference(fmt: str, rounding: str):
    x = mixed_data()
    for scale_rule in SCALE_RULES:
        for axis, xx in ((-1, x), (0, x[:, :50])):  # axis 0 pads 24 -> 32
            ours = quantize_mx(xx, fmt, rounding=rounding, scale_rule=scale_rule, axis=axis)
            ref = quantize_mx_reference(xx, fmt, rounding=rounding, scale_rule=scale_rule, axis=axis)
            assert_bitwise(ours, ref)


@pytest.mark.parametrize("block_size", [1, 7, 16, 32, 100])
def test_block_sizes_and_3d_axes(block_size: int):
    x = torch.randn(3, 40, 5, generator=torch.Generator().manual_seed(block_size))
    for axis in (0, 1, 2, -2):
        ours = quantize_mx(x, "fp6_e3m2", block_size=block_size, axis=axis)
        assert_bitwise(ours, quantize_mx_reference(x, "fp6_e3m2", block_size=block_size, axis=axis))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_compute_in_fp32(dtype: torch.dtype):
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = quantize_mx(x, "fp8_e4m3")
    assert y.dtype == dtype and y.shape == x.shape
    assert_bitwise(y, quantize_mx(x.float(), "fp8_e4m3").to(dtype))
    assert_bitwise(y.float(), quantize_mx(x.float(), "fp8_e4m3"))  # the cast back is exact here


def test_non_contiguous_input():
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(2))
    assert_bitwise(
        quantize_mx(x.t(), "fp4_e2m1", axis=0), quantize_mx(x.t().contiguous(), "fp4_e2m1", axis=0)
    )


def corner_data() -> torch.Tensor:
    x = mixed_data(3)
    x[3, :32] = torch.tensor([float("nan")] + [1.0] * 31)
    x[4, 32:64] = torch.tensor([float("inf"), -2.0] + [0.5] * 30)
    x[5, :4] = torch.tensor([3.4028235e38, -1e38, 448.0, -0.0])
    x[6, :3] = torch.tensor([64 * (1 - 2**-24), 0.5 - 2**-25, -1e-45])
    return x


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_decode_of_encode_equals_quantize(fmt: str):
    """Bitwise, except MXINT8's missing -0: there -0.0 decodes as +0.0 (asserted to happen only at zeros)."""
    x = corner_data()
    for rounding, scale_rule, axis in [
        ("nearest_even", "floor", -1),
        ("nearest_away", "rceil", 0),
        ("toward_zero", "ceil", -1),
        ("stochastic", "even", 0),
    ]:
        kw = dict(rounding=rounding, scale_rule=scale_rule, axis=axis)
        q = quantize_mx(x, fmt, seed=7, **kw)
        mx = encode_mx(x, fmt, seed=7, **kw)
        d = decode_mx(mx)
        assert mx.codes.dtype == torch.uint8 and mx.codes.shape == x.shape
        assert mx.scales_e8m0.dtype == torch.uint8 and mx.num_blocks == -(-x.shape[axis] // 32)
        if FORMATS[fmt].is_int:
            differ = bits(q) != bits(d)
            assert torch.all(q[differ] == 0) and torch.all(d[differ].view(torch.int32) == 0)
            q = torch.where(q == 0, torch.zeros_like(q), q)
            assert int((mx.codes == 0x80).sum()) == 0  # -2.0 never produced
        assert_bitwise(d, q)
        assert int(mx.codes.int().max()) < (1 << FORMATS[fmt].bits)


@pytest.mark.parametrize("fmt,dtype", [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_codes_are_torch_float8_bit_patterns(fmt: str, dtype: torch.dtype):
    x = corner_data()
    mx = encode_mx(x, fmt)
    scale = torch.exp2(mx.scales_e8m0.float() - 127).repeat_interleave(32, dim=-1)
    finite = mx.scales_e8m0.repeat_interleave(32, dim=-1) != 0xFF
    scaled = (x / scale).clamp(-FORMATS[fmt].max_norm, FORMATS[fmt].max_norm)
    torch_codes = scaled.to(dtype).view(torch.uint8)
    assert torch.equal(mx.codes[finite], torch_codes[finite])
    assert torch.all(mx.codes[~finite] == 0) and int((~finite).sum()) == 64


def test_scale_bytes():
    x = torch.zeros(4, 32)
    x[0, 0], x[1, 5], x[2, 0], x[3, 0] = 1.0, float("nan"), 1e-45, 2.0**100
    s = encode_mx(x, "fp8_e4m3").scales_e8m0.flatten().tolist()
    assert s == [127 - 8, 0xFF, 0, 127 + 100 - 8]


def test_compiled_matches_eager_bitwise__only_compile_test():
    """THE ONLY torch.compile TEST: compiled == eager bitwise on one small shape (3 variants)."""
    x = corner_data()[:, :80]  # axis 1 of 80 -> padded last block
    for fmt, rounding in [("fp8_e4m3", "nearest_even"), ("fp4_e2m1", "nearest_away"), ("int8", "stochastic")]:
        eager = quantize_mx(x, fmt, rounding=rounding, axis=1, seed=5)
        compiled = quantize_mx_compiled(x, fmt, rounding=rounding, axis=1, seed=5)
        assert_bitwise(compiled, eager)
