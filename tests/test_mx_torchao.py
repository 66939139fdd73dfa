"""Bitwise agreement with torchao's MX emulation (to_mx + dequantize), and the deliberate differences.

torchao supports fp8/fp6/fp4 elements, blocks along the last dim only, and
dims divisible by the block size (no int8, no padding), so that is what is
compared. Differences (d), (e), (f) of recipes.mx.quantize are tested here.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchao", reason="torchao is an optional reference for the MX emulation")
mx_tensor = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor", reason="torchao without mx_formats")
from torchao.prototype.mx_formats.config import ScaleCalculationMode  # noqa: E402
from torchao.prototype.mx_formats.kernels import f4_unpacked_to_f32, unpack_uint4  # noqa: E402
from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize, per_tensor_amax_to_scale  # noqa: E402

from recipes.mx import quantize_mx, quantize_nvfp4  # noqa: E402
from recipes.mx.reference import quantize_mx_reference  # noqa: E402

AO_DTYPES = {
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "fp6_e3m2": "fp6_e3m2",
    "fp6_e2m3": "fp6_e2m3",
    "fp4_e2m1": torch.float4_e2m1fn_x2,
}
MODES = ["floor", "rceil", "ceil", "even"]


def ao_qdq(x: torch.Tensor, fmt: str, mode: str = "floor", block_size: int = 32) -> torch.Tensor:
    scale, data = mx_tensor.to_mx(x, AO_DTYPES[fmt], block_size, ScaleCalculationMode(mode))
    return mx_tensor.to_dtype(data, scale, AO_DTYPES[fmt], block_size, torch.float32)


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[t.isnan()] = float("nan")
    return t.view(torch.int32)


def data(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(64, 512, generator=g)
    if kind == "scaled":  # randn times 2^U(-40,40) per 32-element block
        e = torch.randint(-40, 41, (64, 16, 1), generator=g).float()
        x = (x.view(64, 16, 32) * torch.exp2(e)).view(64, 512)
    return x


@pytest.mark.parametrize("fmt", list(AO_DTYPES))
@pytest.mark.parametrize("kind", ["randn", "scaled"])
def test_bitwise_equal_to_torchao(fmt: str, kind: str):
    x = data(kind)
    for mode in MODES:
        ours = quantize_mx(x, fmt, rounding="nearest_even", scale_rule=mode)
        theirs = ao_qdq(x, fmt, mode)
        diff = bits(ours) != bits(theirs)
        assert not diff.any(), (
            f"{mode}: {int(diff.sum())} differ, e.g. {ours[diff][:3]} vs {theirs[diff][:3]}"
        )


def test_difference_d_tiny_blocks_torchao_halves():
    """Scale 2^-127 blocks: torchao divides by 2^-126 but multiplies back by 2^-127.

    So torchao returns the quantization of x/2; lowbit (and microxcaling) use 2^-127 both ways.
    """
    x = torch.zeros(2, 32)
    x[0, :4] = torch.tensor([-40182.0, 71364.0, 2142.0, 0.0]) * 2.0**-149  # ~ -5.63e-41; /2 is exact
    x[1, :2] = torch.tensor([2.0**-130, -(2.0**-133)])
    for fmt in AO_DTYPES:
        ours, theirs = quantize_mx(x, fmt), ao_qdq(x, fmt)
        assert torch.equal(bits(ours), bits(quantize_mx_reference(x, fmt)))
        assert torch.equal(bits(ours), bits(quantize_mx_reference(x, fmt, microxcaling=True)))
        assert torch.equal(bits(theirs), bits(quantize_mx(x * 0.5, fmt))), fmt
        nonzero = ours != 0  # (fp4 rounds everything here to zero)
        assert torch.all(ours[nonzero] != theirs[nonzero])
    # e4m3, first element: lowbit/microxcaling -5.74e-41, torchao -2.30e-41
    assert quantize_mx(x, "fp8_e4m3")[0, 0].item() == pytest.approx(-5.74e-41, rel=1e-2)
    assert ao_qdq(x, "fp8_e4m3")[0, 0].item() == pytest.approx(-2.30e-41, rel=1e-2)


def test_difference_d_tiny_blocks_torchao_rceil_scales_by_one():
    """RCEIL: torchao gives a block whose scale would be 2^-127 the scale 1.0, so its ~1e-40 values
    underflow every element format to zero; lowbit keeps the 2^-127 scale and the values."""
    x = torch.zeros(2, 32)
    x[0, :4] = torch.tensor([-40182.0, 71364.0, 2142.0, 0.0]) * 2.0**-149
    x[1, :2] = torch.tensor([2.0**-130, -(2.0**-133)])
    for fmt in AO_DTYPES:
        ours, theirs = quantize_mx(x, fmt, scale_rule="rceil"), ao_qdq(x, fmt, "rceil")
        assert torch.all(theirs == 0), fmt
        assert torch.equal(bits(ours), bits(quantize_mx_reference(x, fmt, scale_rule="rceil")))
        assert (ours != 0).any() == (fmt != "fp4_e2m1"), fmt  # fp4's 0.5 quantum rounds all to zero
    assert quantize_mx(x, "fp8_e4m3", scale_rule="rceil")[1, 0].item() == pytest.approx(7.35e-40, rel=1e-2)


def test_difference_e_inf_block_torchao_keeps_inf():
    x = torch.ones(2, 32)
    x[0, 3] = float("inf")
    x[1, 0] = -float("inf")
    for fmt in AO_DTYPES:
        ours, theirs = quantize_mx(x, fmt), ao_qdq(x, fmt)
        assert ours.isnan().all()
        assert theirs[0, 3].item() == float("inf") and theirs[1, 0].item() == -float("inf")
        assert (theirs[0, :3] == 0).all() and (theirs[1, 1:] == 0).all()


def test_difference_f_torchao_rceil_float32_log2():
    """d = amax/448 = 2^10 (1 + 2^-23): exact ceil(log2 d) = 11; torchao's float32 log2 gives 10."""
    d = 2.0**10 * (1 + 2.0**-23)
    assert torch.log2(torch.tensor(d)).item() == 10.0  # the float32 rounding
    x = torch.zeros(1, 32)
    x[0, 0] = d * 448  # exactly representable: amax / 448 == d in float32
    x[0, 1] = 2.0**10 * 2.0**-9  # one e4m3 subnormal step at scale 2^10, a tie to 0 at 2^11
    ours = quantize_mx(x, "fp8_e4m3", scale_rule="rceil")
    theirs = ao_qdq(x, "fp8_e4m3", "rceil")
    assert ours[0, 1].item() == 0.0 and theirs[0, 1].item() == 2.0
    assert torch.equal(bits(ours), bits(quantize_mx_reference(x, "fp8_e4m3", scale_rule="rceil")))


def ao_nvfp4(x: torch.Tensor) -> torch.Tensor:
    s_t = per_tensor_amax_to_scale(x.abs().amax())
    scales, packed = nvfp4_quantize(x, 16, s_t)
    values = f4_unpacked_to_f32(unpack_uint4(packed)).view(x.shape[0], -1, 16)
    return (values * (s_t * scales.float()).unsqueeze(-1)).view(x.shape)


@pytest.mark.parametrize("kind", ["randn", "scaled_small"])
def test_nvfp4_bitwise_equal_to_torchao(kind: str):
    x = data("randn")
    if kind == "scaled_small":  # per-block magnitudes within E4M3's normal range of the tensor scale
        e = torch.randint(-5, 4, (64, 32, 1), generator=torch.Generator().manual_seed(3)).float()
        x = (x.view(64, 32, 16) * torch.exp2(e)).view(64, 512)
    assert torch.equal(
        bits(quantize_nvfp4(x, order="torchao")), bits(ao_nvfp4(x))
    )  # TE's order: test_nvfp4_te
