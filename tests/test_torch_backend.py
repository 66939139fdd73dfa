"""recipe.backend=torch: real FP8 GEMMs through torch's scaled matmul, against the emulated twin.

The CPU facts these tests rest on were measured with torch 2.13 (CPU wheel): ``torch._scaled_mm``
takes tensorwise and rowwise FP32 scales, E4M3 and E5M2 operands, and refuses block and E8M0
scales; with rowwise scales its FP32 result equals the FP32 GEMM of ``q * scale_inv``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from recipes.backends import torch_problem
from recipes.base import get_recipe
from recipes.errors import ConfigError
from recipes.fp8 import E4M3, E5M2, cast_to_fp8, current_scale
from recipes.fp8.gemm import Operand, features, scaled_gemm
from recipes.qlinear import QuantLinear
from recipes.scaled_linear import ScaledLinear
from train.config import ModelConfig
from train.model import build_model

from .test_recipes_quantized import preset

TORCH_PRESETS = ("fp8_current", "fp8_delayed", "fp8_rowwise")


class OpCount(TorchDispatchMode):
    """Counts every aten op that runs (by overload packet name)."""

    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    def count(self, *names: str) -> int:
        return sum(self.ops.get(f"aten.{n}", 0) for n in names)


def fp8(shape, fmt=E4M3, spread=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * spread).clamp(-fmt.max, fmt.max).to(fmt.dtype)


# ---------------------------------------------------------------- the scaled matmul itself


def test_cpu_scaled_mm_features_are_probed():
    f = features("cpu")
    assert f.available and f.rowwise and f.e5m2_first and f.fp32_out_rowwise
    assert not f.block_1x128 and not f.mx  # torch 2.13 on CPU: "Invalid scaling configuration"


@pytest.mark.parametrize("layout", ["row_major_b", "col_major_b", "col_major_a"])
def test_scaled_gemm_equals_fp32_gemm_of_dequantized_operands(layout):
    """Unit, per-tensor and rowwise scales, any memory layout: bit for bit (the CPU kernel)."""
    q_a, q_w = fp8((17, 96)), fp8((33, 96), seed=1)
    cases = [
        (torch.tensor(1.0), torch.tensor(1.0)),
        (torch.tensor(0.37), torch.tensor(1.7)),
        (torch.rand(17, 1) + 0.5, torch.rand(33, 1) + 0.5),
    ]
    for sa, sw in cases:
        a, b = Operand(q_a, sa), Operand(q_w, sw).t()  # b: [96, 33], a transposed view (col-major)
        if layout == "row_major_b":
            b = Operand(b.q.contiguous(), b.scale_inv)
        if layout == "col_major_a":
            a = Operand(q_a.t().contiguous().t(), sa)
        got = scaled_gemm(a, b)
        assert got.dtype == torch.float32 and got.shape == (17, 33)
        assert torch.equal(got, a.dequantize() @ b.dequantize())
    unit = scaled_gemm(Operand(q_a, torch.tensor(1.0)), Operand(q_w, torch.tensor(1.0)).t())
    assert torch.equal(unit, q_a.float() @ q_w.float().t())  # the FP8 values' exact FP32 GEMM


def test_scaled_gemm_takes_e5m2_gradients():
    g, w = fp8((16, 64), E5M2), fp8((64, 32), seed=2)
    got = scaled_gemm(Operand(g, torch.tensor(0.5)), Operand(w, torch.tensor(2.0)))
    assert torch.equal(got, g.float() @ w.float())


def test_per_tensor_scale_beside_rowwise_scale_is_expanded():
    a, b = (
        Operand(fp8((8, 32)), torch.tensor(0.25)),
        Operand(fp8((16, 32), seed=3), torch.rand(16, 1) + 1).t(),
    )
    assert torch.equal(scaled_gemm(a, b), a.dequantize() @ b.dequantize())


# ---------------------------------------------------------------- one layer, both backends


def _layer_pair(name: str, *, bias: bool, emulated_gemm: str = "auto", **over):
    out = {}
    for backend in ("emulated", "torch"):
        gemm = {"emulated_gemm": emulated_gemm} if backend == "emulated" else {}
        rec = get_recipe(preset(name, backend=backend, **gemm, **over))
        rec.resolve("cpu")
        torch.manual_seed(0)
        holder = nn.Module()
        holder.fc = nn.Linear(64, 96, bias=bias).to(torch.bfloat16)
        rec.convert(holder)
        out[backend] = (rec, holder.fc)
    return out


def _fwd_bwd(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(32, 64, generator=g) * 3).to(torch.bfloat16).requires_grad_()
    y = layer(x)
    (y.float() * torch.randn(y.shape, generator=g)).sum().backward()
    return y.detach(), x.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad


@pytest.mark.parametrize("name", TORCH_PRESETS)
def test_each_layer_issues_exactly_three_scaled_mm_and_no_fp32_matmul(name):
    pair = _layer_pair(name, bias=True)
    assert isinstance(pair["torch"][1], ScaledLinear) and isinstance(pair["emulated"][1], QuantLinear)
    with OpCount() as ops:
        _fwd_bwd(pair["torch"][1])
    assert ops.count("_scaled_mm") == 3, ops.ops
    assert ops.count("mm", "addmm", "bmm", "matmul", "linear") == 0, ops.ops
    with OpCount() as emu:
        _fwd_bwd(pair["emulated"][1])
    assert emu.count("_scaled_mm") == 0 and emu.count("mm", "addmm") == 3  # the emulated twin, for contrast


@pytest.mark.parametrize("name,over", [
    ("fp8_rowwise", {}),                       # power-of-two rowwise scales (torchao rowwise)
    ("fp8_current", {"power_2_scales": True}),  # power-of-two per-tensor scales
    ("fp8_delayed", {}),                        # first step: every scale is 1.0
])  # fmt: skip
def test_power_of_two_scales_give_bitwise_equal_gemm_outputs(name, over):
    pair = _layer_pair(name, bias=True, **over)
    emu, real = _fwd_bwd(pair["emulated"][1]), _fwd_bwd(pair["torch"][1])
    for what, a, b in zip(("y", "dx", "dw", "db"), emu, real):
        assert torch.equal(a, b), what


@pytest.mark.parametrize("gemm,agree", [("bf16", 0.95), ("codes", 0.6)])
def test_arbitrary_scales_differ_only_by_where_the_scale_is_applied(gemm, agree):
    """fp8_current's FP32 scales are not powers of two. The operands are the same FP8 codes.
    ``emulated_gemm=bf16`` feeds ``q / s`` to an FP32 GEMM, the scaled matmul ``q * (1/s)``: at
    most 1 ulp of FP32 apart per element, so the FP32 GEMM outputs are a few FP32 ulps apart and
    the BF16-rounded outputs agree except where that flips a rounding: by at most 1 BF16 ulp, on
    a small fraction of elements. ``codes`` (the default) runs the codes in a BF16 GEMM, which on
    the CPU rounds to BF16 before the scale: also at most 1 BF16 ulp, on more elements."""
    pair = _layer_pair("fp8_current", bias=False, emulated_gemm=gemm)
    emu, real = _fwd_bwd(pair["emulated"][1]), _fwd_bwd(pair["torch"][1])
    for what, a, b in zip(("y", "dx", "dw"), emu, real):
        a, b = a.float(), b.float()
        ulp = torch.finfo(torch.bfloat16).eps * a.abs().clamp_min(torch.finfo(torch.float32).tiny)
        assert ((a - b).abs() <= ulp).all(), what
        assert (a == b).float().mean() > agree, what


@pytest.mark.parametrize("name", TORCH_PRESETS)
def test_quantized_operands_are_identical_codes(name):
    """The torch backend's casts hold the emulated roles' codes: ``q(x) == cast(x).q / s`` with the
    scale ``s`` the role used (for power-of-two and unit scales ``q * scale_inv`` is that value)."""
    rec = get_recipe(preset(name, backend="torch"))
    rec.resolve("cpu")
    qs = rec.linear_quantizers("fc")
    x = (torch.randn(32, 64) * 5).float()
    for role, axis in ((qs.input, -1), (qs.input_wgrad, 0), (qs.grad_output, -1), (qs.grad_output, 0)):
        op = role.cast(x, axis=axis)
        assert op.q.dtype in (E4M3.dtype, E5M2.dtype)
        if name == "fp8_current":
            s = current_scale(x, role.fmt)
            q, _ = cast_to_fp8(x, role.fmt, s)
            assert torch.equal(op.q.view(torch.uint8), q.view(torch.uint8))
            assert torch.equal(role(x, axis=axis), op.q.float() / s)
        else:  # rowwise: power-of-two scales; delayed before its first update: scale 1.0
            assert torch.equal(role(x, axis=axis), op.dequantize())
            if name == "fp8_rowwise":
                assert op.scale_inv.shape[axis % 2] == 1 and op.scale_inv.numel() == x.shape[1 - axis % 2]


def test_weight_cast_is_cached_within_a_step_and_refreshed_after_it():
    rec, layer = _layer_pair("fp8_current", bias=False)["torch"]
    for _ in range(3):  # three micro-batches of one optimizer step
        _fwd_bwd(layer)
    assert layer.weight_cache_hits == 2
    with torch.no_grad():
        layer.weight.mul_(2.0)  # the optimizer step
    rec.on_optimizer_step()
    y_after, *_ = _fwd_bwd(layer)
    assert layer.weight_cache_hits == 2  # a new epoch recasts
    fresh = dataclasses.replace(layer.gemms, epoch=None)
    uncached = ScaledLinear.from_linear(layer, fresh)
    assert torch.equal(
        uncached(torch.zeros(1, 64, dtype=torch.bfloat16)), layer(torch.zeros(1, 64, dtype=torch.bfloat16))
    )
    x = torch.randn(4, 64).to(torch.bfloat16)
    assert torch.equal(uncached(x), layer(x))


def test_evaluation_forwards_do_not_fill_the_cache_or_record_amaxes():
    rec, layer = _layer_pair("fp8_delayed", bias=False)["torch"]
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(8, 64).to(torch.bfloat16))
    assert rec.delayed is not None and float(rec.delayed.amax_history[0].abs().sum()) == 0.0
    layer.train()
    _fwd_bwd(layer)
    assert layer.weight_cache_hits == 0 and float(rec.delayed.amax_history[0].min()) > 0


# ---------------------------------------------------------------- a whole model step


def test_model_step_runs_three_scaled_mm_per_converted_layer_per_micro_batch():
    rec = get_recipe(preset("fp8_delayed", backend="torch"))
    rec.resolve("cpu")
    model = build_model(ModelConfig(n_layers=2, d_model=64, n_heads=2, seq_len=32), vocab_size=256, seed=0)
    report = rec.convert(model)
    x = torch.randint(0, 256, (2, 32))
    micro_batches = 2
    with OpCount() as ops:
        for _ in range(micro_batches):
            model(x, x).backward()
    assert ops.count("_scaled_mm") == 3 * len(report.converted) * micro_batches
    assert sum(isinstance(m, ScaledLinear) for m in model.modules()) == len(report.converted) == 8


# ---------------------------------------------------------------- resolution and refusals


def test_explicit_torch_backend_resolves_and_records_the_gemm():
    rec = get_recipe(preset("fp8_delayed", backend="torch"))
    assert rec.resolve("cpu") is None and rec.backend == "torch"
    assert rec.gemm_impl.startswith("torch._scaled_mm on cpu") and "real FP8 GEMMs" in rec.gemm_impl


@pytest.mark.parametrize("name,needle", [
    ("fp8_block", "block scales"),
    ("mxfp8_e4m3", "E8M0"),
    ("mxfp4_e2m1", "FP8 GEMMs only"),
    ("nvfp4", "no nvfp4 GEMM"),
])  # fmt: skip
def test_torch_backend_refuses_what_the_device_cannot_run(name, needle):
    with pytest.raises(ConfigError) as e:
        get_recipe(preset(name, backend="torch")).resolve("cpu")
    assert (
        e.value.key == "recipe.backend" and needle in e.value.fix and "recipe.backend=emulated" in e.value.fix
    )


def test_torch_backend_refuses_a_high_precision_operand_and_attention():
    for over, needle in (({"weight_format": None}, "recipe.weight_format=null"),
                         ({"quantize_attention": True}, "attention matmuls")):  # fmt: skip
        with pytest.raises(ConfigError) as e:
            get_recipe(preset("fp8_current", backend="torch", **over)).resolve("cpu")
        assert needle in e.value.fix


def test_fast_accum_is_refused_where_it_would_be_ignored():
    with pytest.raises(ConfigError) as e:
        get_recipe(preset("fp8_current", backend="emulated", fast_accum_dgrad=True)).resolve("cpu")
    assert e.value.key == "recipe.fast_accum_dgrad" and "backend=torch" in e.value.fix


def test_emulated_gemm_is_refused_under_a_hardware_backend():
    with pytest.raises(ConfigError) as e:
        get_recipe(preset("fp8_current", backend="torch", emulated_gemm="fp32")).resolve("cpu")
    assert (e.value.key, e.value.value) == ("recipe.emulated_gemm", "fp32")
    assert "backend=emulated" in e.value.fix
    own = get_recipe(preset("fp8_current", backend="emulated", emulated_gemm="fp32"))
    own.resolve("cpu")  # its own backend takes it


def test_amax_update_is_checked():
    with pytest.raises(ConfigError) as e:
        get_recipe(preset("fp8_current", amax_update="microbatch")).resolve("cpu")
    assert e.value.key == "recipe.amax_update" and "delayed scaling" in e.value.fix
    with pytest.raises(ConfigError):
        get_recipe(preset("fp8_delayed", amax_update="often")).resolve("cpu")


def test_amax_update_microbatch_steps_the_histories_after_every_backward():
    for update, per_step in (("step", 1), ("microbatch", 3)):
        rec, layer = _layer_pair("fp8_delayed", bias=False, amax_update=update)["torch"]
        for _ in range(3):  # three micro-batches of one optimizer step
            _fwd_bwd(layer)
            rec.on_micro_batch()
        rec.on_optimizer_step()
        assert rec.delayed is not None and rec.delayed.num_steps == per_step, update
        # the weight cast is not re-used across a scale update (microbatch: every micro-batch)
        assert layer.weight_cache_hits == (2 if update == "step" else 0), update


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with FP8 tensor cores")
@pytest.mark.parametrize("name", TORCH_PRESETS)
def test_cuda_scaled_linear_matches_the_cpu_codes_and_calls(name):
    """On the GPU: the same FP8 codes as the CPU cast, three scaled matmuls, and outputs that agree
    with the CPU's within the FP32 accumulation order (cuBLAS) and fast accumulation (forward)."""
    if reason := torch_problem(preset(name), "cuda"):
        pytest.skip(reason)
    cpu = _layer_pair(name, bias=True)["torch"][1]
    rec = get_recipe(preset(name, backend="torch"))
    rec.resolve("cuda")
    holder = nn.Module()
    holder.fc = nn.Linear(64, 96).to(torch.bfloat16)
    holder.fc.load_state_dict(cpu.state_dict())
    holder.cuda()
    rec.convert(holder)
    with OpCount() as ops:
        got = [t.cpu() for t in _fwd_bwd_on(holder.fc, "cuda")]
    assert ops.count("_scaled_mm") == 3 and ops.count("mm", "addmm") == 0
    ref = _fwd_bwd(cpu)
    for what, a, b in zip(("y", "dx", "dw", "db"), ref, got):
        rel = float((a.float() - b.float()).abs().max() / a.float().abs().max())
        assert rel < 2e-2, (what, rel)


def _fwd_bwd_on(layer, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(32, 64, generator=g) * 3).to(torch.bfloat16).to(device).requires_grad_()
    y = layer(x)
    (y.float() * torch.randn(y.shape, generator=g).to(device)).sum().backward()
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad
