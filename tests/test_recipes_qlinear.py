"""Quantized Linear / matmul autograd against hand-written references on small shapes.

The references call the pure quantizers directly, blocking the token axis by
transposing (not via ``axis=0``), and run the same FP32 GEMM on the same
memory layout, so forward, dgrad and wgrad must match bit for bit.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from recipes.fp8 import E4M3, E5M2, DelayedScaling, DelayedScalingState, quantize_fp8_current
from recipes.mx import quantize_mx, quantize_nvfp4
from recipes.mx.nvfp4 import hadamard_tokens, quantize_nvfp4_2d, random_hadamard
from recipes.qattention import MatmulQuantizers, QuantAttentionCore, quant_matmul
from recipes.qlinear import LinearQuantizers, QuantLinear
from recipes.quantizers import FP8CurrentRole, FP8DelayedRole, MXRole, NVFP4Role, SRGenerator

BF16 = torch.bfloat16


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(
            a.view(torch.int16 if a.element_size() == 2 else torch.int32),
            b.view(torch.int16 if b.element_size() == 2 else torch.int32),
        )
    )


def make(shape_x=(2, 64, 64), n=96, *, dtype=BF16, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(shape_x[-1], n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
    lin = lin.to(dtype)
    x = torch.randn(shape_x, generator=g).to(dtype)
    gy = (torch.randn(*shape_x[:-1], n, generator=g) * 1e-3).to(dtype)
    return lin, x, gy


def run(module: nn.Module, x: torch.Tensor, gy: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(gy)
    b = module.bias.grad if module.bias is not None else None
    return y.detach(), x.grad, module.weight.grad, b


def qlin(lin: nn.Linear, qs: LinearQuantizers) -> QuantLinear:
    copy = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None).to(lin.weight.dtype)
    copy.load_state_dict(lin.state_dict())
    return QuantLinear.from_linear(copy, qs, name="layer")


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_all_roles_null_is_nn_linear_bitwise(dtype, bias):
    lin, x, gy = make(dtype=dtype, bias=bias)
    ref = run(lin, x, gy)
    got = run(qlin(lin, LinearQuantizers()), x, gy)
    for r, o in zip(ref, got):
        assert (r is None and o is None) or bits_equal(r, o)


def test_from_linear_shares_parameters_and_keys():
    lin = nn.Linear(32, 16)
    q = QuantLinear.from_linear(lin, LinearQuantizers(input=MXRole("fp8_e4m3")))
    assert q.weight is lin.weight and q.bias is lin.bias
    assert list(q.state_dict()) == list(lin.state_dict()) == ["weight", "bias"]
    assert isinstance(q, nn.Linear) and "fp8_e4m3" in repr(q)


def mx_reference(lin, x, gy, fmt, *, block=32, rounding="nearest_even"):
    """Forward/dgrad/wgrad written out with quantize_mx; token blocks via transposed copies."""
    K, N = lin.in_features, lin.out_features
    x32 = x.reshape(-1, K).float()
    w32 = lin.weight.detach().float()
    g32 = gy.reshape(-1, N).float()

    def q(t):  # blocks along the last axis
        return quantize_mx(t, fmt, block_size=block, rounding=rounding)

    y = torch.addmm(lin.bias.detach().float(), q(x32), q(w32).t()).to(x.dtype).view(*x.shape[:-1], N)
    dx = torch.mm(q(g32), q(w32.t().contiguous()).t().contiguous()).to(x.dtype).view(x.shape)
    qg_tok = q(g32.t().contiguous()).t().contiguous()  # [M, N] blocked along M
    qx_tok = q(x32.t().contiguous()).t().contiguous()
    dw = torch.mm(qg_tok.t(), qx_tok).to(lin.weight.dtype)
    db = g32.sum(0).to(lin.bias.dtype)
    return y, dx, dw, db


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp6_e3m2", "fp4_e2m1", "int8"])
def test_mx_linear_matches_reference_bitwise(fmt):
    lin, x, gy = make()
    r = MXRole(fmt)
    qs = LinearQuantizers(input=r, weight=r, grad_output=r, weight_dgrad=r, input_wgrad=r)
    got = run(qlin(lin, qs), x, gy)
    ref = mx_reference(lin, x, gy, fmt)
    for name, a, b in zip(("y", "dx", "dw", "db"), got, ref):
        assert bits_equal(a, b), name


def test_mx_linear_blocks_along_the_right_axes():
    """Each role sees the operand and axis of the module docstring's table."""
    seen = []

    class Spy(MXRole):
        def __call__(self, x, *, axis, training=True):
            seen.append((self.fmt, tuple(x.shape), axis))
            return super().__call__(x, axis=axis, training=training)

    lin, x, gy = make(shape_x=(2, 32, 64), n=96)
    qs = LinearQuantizers(Spy("fp8_e4m3"), Spy("fp6_e3m2"), Spy("fp4_e2m1"), Spy("fp6_e2m3"), Spy("int8"))
    run(qlin(lin, qs), x, gy)
    assert seen == [
        ("fp8_e4m3", (64, 64), -1),  # x along K
        ("fp6_e3m2", (96, 64), -1),  # W along K
        ("fp4_e2m1", (64, 96), -1),  # dY along N (dgrad)
        ("fp6_e2m3", (96, 64), 0),  # W along N (dgrad)
        ("fp4_e2m1", (64, 96), 0),  # dY along tokens (wgrad)
        ("int8", (64, 64), 0),  # x along tokens (wgrad)
    ]


def test_identity_on_representable_values_equals_fp32_linear():
    """Small integers are exact in MXFP8 E4M3 blocks: the quantized layer is then plain FP32 math."""
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randint(-4, 5, (32, 64), generator=g).float())
    x = torch.randint(-4, 5, (2, 16, 64), generator=g).float()
    gy = torch.randint(-4, 5, (2, 16, 32), generator=g).float()
    r = MXRole("fp8_e4m3")
    got = run(qlin(lin, LinearQuantizers(r, r, r, r, r)), x, gy)
    xx = x.double().reshape(-1, 64).requires_grad_(True)
    w = lin.weight.detach().double().requires_grad_(True)
    y = xx @ w.t()
    y.backward(gy.double().reshape(-1, 32))
    assert torch.equal(got[0].double().reshape(-1, 32), y.detach())
    assert torch.equal(got[1].double().reshape(-1, 64), xx.grad)
    assert torch.equal(got[2].double(), w.grad)


def test_partial_roles_keep_others_in_fp32():
    lin, x, gy = make(bias=False)
    q = MXRole("fp4_e2m1")
    got = run(qlin(lin, LinearQuantizers(weight=q, weight_dgrad=q)), x, gy)
    x32, w32 = x.reshape(-1, 64).float(), lin.weight.detach().float()
    assert bits_equal(got[0], torch.mm(x32, quantize_mx(w32, "fp4_e2m1").t()).to(BF16).view(2, 64, 96))
    dw = torch.mm(gy.reshape(-1, 96).float().t(), x32).to(BF16)
    assert bits_equal(got[2], dw)


def test_fp8_current_scaling_reuses_one_grad_copy():
    lin, x, gy = make()
    qa, qg = FP8CurrentRole(E4M3), FP8CurrentRole(E5M2)
    got = run(qlin(lin, LinearQuantizers(qa, qa, qg, qa, qa)), x, gy)
    x32, w32, g32 = x.reshape(-1, 64).float(), lin.weight.detach().float(), gy.reshape(-1, 96).float()
    q4 = lambda t: quantize_fp8_current(t, E4M3)
    qgv = quantize_fp8_current(g32, E5M2)
    assert bits_equal(
        got[0], torch.addmm(lin.bias.detach().float(), q4(x32), q4(w32).t()).to(BF16).view(2, 64, 96)
    )
    assert bits_equal(got[1], torch.mm(qgv, q4(w32)).to(BF16).view(x.shape))
    assert bits_equal(got[2], torch.mm(qgv.t(), q4(x32)).to(BF16))


def test_delayed_scaling_names_scales_and_eval():
    state = DelayedScalingState(DelayedScaling(fp8_format="HYBRID", amax_history_len=4))
    roles = {r: FP8DelayedRole(state, f"blocks.0.attn.qkv/{r}") for r in ("input", "weight", "grad_output")}
    for r in roles.values():
        state.register(r.name)
    qs = LinearQuantizers(
        roles["input"], roles["weight"], roles["grad_output"], roles["weight"], roles["input"]
    )
    lin, x, gy = make()
    mod = qlin(lin, qs)
    mod.eval()
    with torch.no_grad():
        mod(x)
    assert torch.count_nonzero(state.amax_history) == 0  # evaluation records nothing
    mod.train()
    run(mod, x, gy)
    assert state.names == (
        "blocks.0.attn.qkv/input",
        "blocks.0.attn.qkv/weight",
        "blocks.0.attn.qkv/grad_output",
    )
    assert state.format("blocks.0.attn.qkv/grad_output") is E5M2
    amax = state.amax_history[0].clone()
    assert amax[0] == x.float().abs().max() and amax[2] == gy.float().abs().max()
    state.step()
    assert torch.equal(state.scales, torch.tensor([448.0, 448.0, 57344.0]) / amax)


def test_nvfp4_2d_tiles_equal_1d_blocks_on_row_constant_tiles():
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(4, 1, 48, generator=g) * torch.logspace(-3, 1, 4).view(4, 1, 1)
    w = rows.expand(4, 16, 48).reshape(64, 48)  # every 16-row tile has identical rows
    assert torch.equal(quantize_nvfp4_2d(w), quantize_nvfp4(w, axis=-1))
    q = NVFP4Role(two_d=True)
    assert q.axis_free and torch.equal(q(w, axis=0), q(w, axis=-1))


def test_nvfp4_2d_against_scalar_reference():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 32, generator=g)
    w[:16, 16:] *= 1e-3  # one tile with a much smaller scale
    got = quantize_nvfp4_2d(w)
    s_t = w.abs().max() / (6 * 448)
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    for i in range(2):
        for j in range(2):
            tile = w[16 * i : 16 * i + 16, 16 * j : 16 * j + 16]
            s_b = ((tile.abs().max() / 6) / s_t).clamp(2**-6, 448).to(torch.float8_e4m3fn).float()
            v = tile * ((1 / s_t) / s_b)
            idx = (v.abs().unsqueeze(-1) - grid).abs().argmin(-1)  # nearest (no exact ties in randn data)
            ref = grid[idx].copysign(v) * (s_t * s_b)
            assert torch.equal(got[16 * i : 16 * i + 16, 16 * j : 16 * j + 16], ref)


def test_random_hadamard_is_orthonormal_and_preserves_wgrad():
    h = random_hadamard(torch.device("cpu"))
    assert torch.allclose(h @ h.t(), torch.eye(16), atol=1e-6)
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(48, 8, generator=g), torch.randn(48, 5, generator=g)
    ha, hb = hadamard_tokens(a), hadamard_tokens(b)
    assert ha.shape == (48, 8)
    assert torch.allclose(ha.t() @ hb, a.t() @ b, atol=1e-5)


def test_nvfp4_grad_stochastic_rounding_is_seeded_and_unbiased_enough():
    lin, x, gy = make(bias=False)

    def grads(seed):
        sr = SRGenerator(seed)
        qx, qw, qg = NVFP4Role(), NVFP4Role(two_d=True), NVFP4Role("stochastic", sr=sr)
        return run(qlin(lin, LinearQuantizers(qx, qw, qg, qw, qx, hadamard_tokens)), x, gy)

    a, b, c = grads(0), grads(0), grads(1)
    assert bits_equal(a[2], b[2]) and not bits_equal(a[2], c[2])
    exact = torch.mm(gy.reshape(-1, 96).float().t(), x.reshape(-1, 64).float())
    rel = (a[2].float() - exact).norm() / exact.norm()
    assert rel < 0.35, rel


def test_quant_matmul_backward_matches_reference_bitwise():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(2, 3, 64, 32, generator=g).requires_grad_(True)
    b = torch.randn(2, 3, 32, 64, generator=g).requires_grad_(True)
    gy = torch.randn(2, 3, 64, 64, generator=g)
    qa, qg = MXRole("fp8_e4m3"), MXRole("fp8_e5m2")
    out = quant_matmul(a, b, MatmulQuantizers(qa, qa, qg, qa, qa))
    out.backward(gy)
    q4 = lambda t, ax: quantize_mx(t, "fp8_e4m3", axis=ax)
    q5 = lambda t, ax: quantize_mx(t, "fp8_e5m2", axis=ax)
    assert torch.equal(out, torch.matmul(q4(a.detach(), -1), q4(b.detach(), -2)))
    assert torch.equal(a.grad, torch.matmul(q5(gy, -1), q4(b.detach(), -1).transpose(-2, -1)))
    assert torch.equal(b.grad, torch.matmul(q4(a.detach(), -2).transpose(-2, -1), q5(gy, -2)))


def test_attention_core_without_quantizers_equals_sdpa():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 4, 16, 32, generator=g).requires_grad_(True) for _ in range(3))
    core = QuantAttentionCore(MatmulQuantizers(), MatmulQuantizers())
    out = core(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(out, ref, atol=1e-5)
    gy = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), gy)
    want = torch.autograd.grad(ref, (q, k, v), gy)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5)


def test_attention_core_quantized_matches_reference():
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 4, 32, 32, generator=g).to(BF16).requires_grad_(True) for _ in range(3))
    r = MXRole("fp8_e4m3")
    core = QuantAttentionCore(MatmulQuantizers(r, r, r, r, r), MatmulQuantizers(r, r, r, r, r))
    out = core(q, k, v)
    assert out.dtype == BF16
    q4 = lambda t, ax: quantize_mx(t.detach().float(), "fp8_e4m3", axis=ax)
    s = torch.matmul(q4(q, -1), q4(k.transpose(-2, -1), -2)) * (1.0 / 32**0.5)
    s = s.masked_fill(torch.ones(32, 32, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.matmul(q4(torch.softmax(s, -1), -1), q4(v, -2)).to(BF16)
    assert bits_equal(out.detach(), ref)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert (out.float() - sdpa).norm() / sdpa.norm() < 0.1  # E4M3 keeps 3 mantissa bits
    out.float().sum().backward()
    assert all(math.isfinite(t.grad.float().abs().sum().item()) for t in (q, k, v))


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("CI") == "true",
    reason="CI keeps torch.compile to one test "
    "(test_mx_quantize.py::test_compiled_matches_eager_bitwise__only_compile_test); run it locally",
)
def test_compiled_quantizers_give_the_same_bits():
    """recipe.compile=true runs the same pure functions under torch.compile: identical values."""
    from recipes.quantizers import FP8BlockRole, FP8RowwiseRole

    g = torch.Generator().manual_seed(8)
    x = torch.randn(64, 128, generator=g) * torch.logspace(-4, 2, 128)
    state = DelayedScalingState(DelayedScaling(amax_history_len=2))
    makers = {
        "mx": lambda c: MXRole("fp6_e3m2", compile=c),
        "nvfp4": lambda c: NVFP4Role(compile=c),
        "nvfp4_2d": lambda c: NVFP4Role(two_d=True, compile=c),
        "fp8_current": lambda c: FP8CurrentRole(E4M3, compile=c),
        "fp8_delayed": lambda c: FP8DelayedRole(state, "layer/grad_output", compile=c),
        "fp8_rowwise": lambda c: FP8RowwiseRole(E4M3, compile=c),
        "fp8_block": lambda c: FP8BlockRole(E4M3, 32, compile=c),
        "fp8_block_2d": lambda c: FP8BlockRole(E4M3, 32, two_d=True, compile=c),
    }
    for name, make_role in makers.items():
        eager, compiled = make_role(False)(x, axis=0), make_role(True)(x, axis=0)
        assert bits_equal(eager, compiled), name


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("CI") == "true",
    reason="CI keeps torch.compile to one test "
    "(test_mx_quantize.py::test_compiled_matches_eager_bitwise__only_compile_test); run it locally",
)
def test_compiled_linear_bodies_give_the_same_bits():
    """Pure roles under LinearQuantizers(compile=True): forward and backward each one compiled graph."""
    lin, x, gy = make()
    r = MXRole("fp4_e2m1")
    eager = run(qlin(lin, LinearQuantizers(r, r, r, r, r)), x, gy)
    compiled = run(qlin(lin, LinearQuantizers(r, r, r, r, r, compile=True)), x, gy)
    for name, a, b in zip(("y", "dx", "dw", "db"), eager, compiled):
        assert bits_equal(a, b), name
