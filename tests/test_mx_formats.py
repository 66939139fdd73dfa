"""MX format table, code tables and argument validation (recipes.mx.formats / encode)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from recipes.mx import FORMATS, ElemFormat, element_values, get_format, quantize_mx
from recipes.mx.encode import encode_mx

# (name, bits, max_norm, smallest subnormal, smallest normal) from the OCP MX v1.0 tables
SPEC = [
    ("fp8_e4m3", 8, 448.0, 2.0**-9, 2.0**-6),
    ("fp8_e5m2", 8, 57344.0, 2.0**-16, 2.0**-14),
    ("fp6_e3m2", 6, 28.0, 2.0**-4, 2.0**-2),
    ("fp6_e2m3", 6, 7.5, 2.0**-3, 1.0),
    ("fp4_e2m1", 4, 6.0, 0.5, 1.0),
]


@pytest.mark.parametrize("name,bits,max_norm,min_sub,min_normal", SPEC)
def test_float_format_constants(name: str, bits: int, max_norm: float, min_sub: float, min_normal: float):
    f = get_format(name)
    assert (f.bits, f.max_norm, f.min_subnormal, f.min_normal) == (bits, max_norm, min_sub, min_normal)
    assert f.emin == 1 - f.bias
    finite = element_values(f)
    finite = finite[torch.isfinite(finite)]
    assert finite.max().item() == max_norm
    assert finite[finite > 0].min().item() == min_sub
    assert 2.0**f.emax <= max_norm < 2.0 ** (f.emax + 1)


def test_int8_constants():
    f = get_format("int8")
    assert f.is_int and f.bits == 8 and f.max_norm == 127 / 64 and f.emax == 0
    values = element_values(f)
    assert values[0x7F].item() == 127 / 64 and values[0x80].item() == -2.0 and values[0x01].item() == 2.0**-6


@pytest.mark.parametrize("name,dtype", [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_value_table_matches_torch(name: str, dtype: torch.dtype):
    """Tables built from the format fields agree with torch's float8 decoding for all 256 codes."""
    ours = element_values(name)
    theirs = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    assert torch.equal(ours.isnan(), theirs.isnan())
    ok = ~ours.isnan()
    assert torch.equal(ours[ok].view(torch.int32), theirs[ok].view(torch.int32))
    assert get_format(name).torch_dtype_name == str(dtype).removeprefix("torch.")


def test_small_float_tables_are_sign_symmetric_and_sorted():
    for name in ("fp6_e3m2", "fp6_e2m3", "fp4_e2m1"):
        f = get_format(name)
        v = element_values(f)
        half = 1 << (f.bits - 1)
        assert len(v) == 2 * half
        assert torch.equal(v[half:], -v[:half])
        assert torch.all(v[1:half] > v[: half - 1])
    assert element_values("fp4_e2m1")[:8].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


def test_lookup_errors_list_valid_names():
    with pytest.raises(ValueError, match="fp8_e4m3, fp8_e5m2, fp6_e3m2, fp6_e2m3, fp4_e2m1, int8"):
        get_format("fp8")
    f = FORMATS["fp4_e2m1"]
    assert get_format(f) is f and isinstance(f, ElemFormat)
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.emax = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rounding="nearest"), "nearest_even, nearest_away"),
        (dict(scale_rule="round"), "floor, ceil, rceil, even"),
        (dict(axis=2), "axis=2"),
        (dict(block_size=0), "block_size"),
        (dict(rounding="stochastic", seed=1, generator=torch.Generator()), "either generator= or seed="),
    ],
)
def test_argument_errors(kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        quantize_mx(torch.ones(2, 4), "fp8_e4m3", **kwargs)


def test_dtype_errors():
    with pytest.raises(ValueError, match="float64"):
        quantize_mx(torch.ones(4, dtype=torch.float64), "int8")
    with pytest.raises(ValueError, match="int32"):
        encode_mx(torch.ones(4, dtype=torch.int32), "int8")


def test_empty_and_scalar_edge_shapes():
    assert quantize_mx(torch.empty(0, 32), "fp8_e4m3").shape == (0, 32)
    with pytest.raises(ValueError, match="out of range"):
        quantize_mx(torch.tensor(1.0), "fp8_e4m3")
    assert quantize_mx(torch.tensor([math.pi]), "fp4_e2m1").item() == 3.0
