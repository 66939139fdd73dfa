"""dY's two copies (``recipe.grad_output_dgrad_format`` / ``grad_output_wgrad_format``): one
backward GEMM quantized without the other, checked against the layer's GEMMs on FP32 operands."""

from __future__ import annotations

import pytest
import torch

from recipes.base import get_recipe
from recipes.config import resolve_same
from recipes.errors import ConfigError
from recipes.probes import probe_for
from tests.test_recipes_quantized import preset, tiny

LAYER = "blocks.0.mlp.fc"


def _layer(name: str = "mxfp4_e2m1", **over):
    model = tiny()
    rec = get_recipe(preset(name, **over))
    rec.resolve_backend("cpu")
    rec.convert(model)
    return model.get_submodule(LAYER)


def _grads(layer, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, layer.in_features, generator=g).requires_grad_(True)
    dy = torch.randn(32, layer.out_features, generator=g) * 1e-2
    dx, dw = torch.autograd.grad(layer(x), (x, layer.weight), dy)
    return x.detach(), dy, dx, dw


def test_same_is_the_default_and_resolves_to_grad_output_format():
    cfg = resolve_same(preset("mxfp4_e2m1"))
    assert (
        cfg.grad_output_dgrad_format == cfg.grad_output_wgrad_format == cfg.grad_output_format == "fp4_e2m1"
    )
    qs = _layer().quantizers
    assert not qs.split_dy and qs.wgrad_dy is qs.grad_output


def test_only_one_backward_gemm_quantized():
    """Every forward and dgrad/wgrad operand in FP32 but dY: with only the dgrad copy quantized,
    dW is the FP32 GEMM ``dY^T x`` exactly and dX is not ``dY W``; and the other way round."""
    hp = dict(input_format=None, weight_format=None, weight_dgrad_format=None, input_wgrad_format=None)
    only_dgrad = _layer(grad_output_wgrad_format=None, **hp)
    x, dy, dx, dw = _grads(only_dgrad)
    w = only_dgrad.weight.detach().float()
    assert only_dgrad.quantizers.split_dy and only_dgrad.quantizers.wgrad_dy is None
    assert torch.equal(dw, (dy.t() @ x).to(dw.dtype))
    assert not torch.allclose(dx, dy @ w, rtol=1e-3, atol=0)
    only_wgrad = _layer(grad_output_dgrad_format=None, **hp)
    x, dy, dx, dw = _grads(only_wgrad)
    assert only_wgrad.quantizers.grad_output is None and only_wgrad.quantizers.wgrad_dy is not None
    assert torch.equal(dx, (dy @ w).to(dx.dtype))
    assert not torch.allclose(dw, dy.t() @ x, rtol=1e-3, atol=0)
    # the quantized copy is the one the recipe's default would use in that GEMM: same bits
    both = _layer(**hp)
    _, _, dx_both, dw_both = _grads(both)
    _, _, dx_d, _ = _grads(only_dgrad)
    assert torch.equal(dx_both, dx_d) and torch.equal(dw_both, dw)


def test_probe_names_the_wgrad_copy():
    layer = _layer(grad_output_wgrad_format="fp8_e4m3")  # MX: dgrad dY in FP4, wgrad dY in FP8
    probe = probe_for(layer)
    x, dy, _, _ = _grads(layer)
    w = layer.weight.detach().float()
    out = probe.finish(probe.backward_sums(dy, x, w, gemm=True, scales=True), world_size=1)
    assert "gemm/wgrad/grad_output_wgrad_sqnr_db" in out and "gemm/wgrad/grad_output_sqnr_db" not in out
    assert "gemm/dgrad/grad_output_sqnr_db" in out
    assert "scales/grad_output_wgrad/zero_block_frac" in out
    # FP8 dY costs the wgrad GEMM far less than FP4 dY costs dgrad
    assert (
        float(out["gemm/wgrad/grad_output_wgrad_sqnr_db"]) > float(out["gemm/dgrad/grad_output_sqnr_db"]) + 6
    )


@pytest.mark.parametrize(
    ("name", "over", "key"),
    [
        (
            "mxfp4_e2m1",
            {"quantize_attention": True, "grad_output_wgrad_format": None},
            "recipe.grad_output_wgrad_format",
        ),
        ("mxfp4_e2m1", {"grad_output_wgrad_format": "fp9"}, "recipe.grad_output_wgrad_format"),
        ("fp8_current", {"grad_output_dgrad_format": "fp8_e4m3"}, "recipe.grad_output_dgrad_format"),
        ("bf16", {"grad_output_wgrad_format": "fp8_e4m3"}, "recipe.quantizer"),
    ],
)
def test_bad_copies_are_config_errors(name, over, key):
    model = tiny()
    rec = get_recipe(preset(name, **over))
    with pytest.raises(ConfigError) as e:
        rec.resolve_backend("cpu")
        rec.check(model)
    assert e.value.key == key


def test_nothing_quantized_is_refused_even_with_grad_output_format_set():
    over = dict(input_format=None, weight_format=None, weight_dgrad_format=None, input_wgrad_format=None,
                grad_output_dgrad_format=None, grad_output_wgrad_format=None)  # fmt: skip
    with pytest.raises(ConfigError, match="quantizes nothing"):
        rec = get_recipe(preset("mxfp4_e2m1", **over))
        rec.resolve_backend("cpu")
        rec.convert(tiny())
