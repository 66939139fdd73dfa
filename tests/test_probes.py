"""Layer probes (``recipes.probes``): the GEMM-output error of a converted layer measured the way
its recipe quantizes, checked against the layer's own autograd GEMMs; probes change no state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from recipes.base import get_recipe
from recipes.gemmstats import gemm_errors_from_sums
from recipes.numerics import db_from_sums
from recipes.probes import GEMM_ROLES, probe_for
from tests.test_recipes_quantized import preset, tiny

LAYER = "blocks.0.attn.qkv"


def converted(name: str, **over):
    model = tiny()
    rec = get_recipe(preset(name, **over))
    rec.resolve_backend("cpu")
    rec.convert(model)
    return model, rec, model.get_submodule(LAYER)


def operands(seed: int = 0, m: int = 64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 128, generator=g)
    dy = torch.randn(m, 384, generator=g) * 1e-3
    return x, dy


def sq(t: torch.Tensor) -> float:
    return float(t.double().square().sum())


def test_probe_gemm_errors_equal_the_layers_own_gemms():
    """The probe's three quantized GEMMs are the ones the layer's autograd runs: its error energy
    against the FP32 GEMMs equals that of the layer's real output, dX and dW (MXFP4, nearest)."""
    _, _, layer = converted("mxfp4_e2m1")
    probe = probe_for(layer)
    x, dy = operands()
    w = layer.weight.detach().float()
    xg = x.clone().requires_grad_(True)
    y = layer(xg)
    dx, dw = torch.autograd.grad(y, (xg, layer.weight), dy)
    want = {
        "fwd": (sq(x @ w.t()), sq(y.detach() - x @ w.t())),
        "dgrad": (sq(dy @ w), sq(dx - dy @ w)),
        "wgrad": (sq(dy.t() @ x), sq(dw - dy.t() @ x)),
    }
    sums = {**probe.forward_sums(x, w, gemm=True, scales=False),
            **probe.backward_sums(dy, x, w, gemm=True, scales=False)}  # fmt: skip
    for gemm, (ref, err) in want.items():
        assert float(sums[f"gemm/{gemm}/ref_sq"]) == pytest.approx(ref, rel=1e-6)
        assert float(sums[f"gemm/{gemm}/err_sq"]) == pytest.approx(err, rel=1e-4)
        assert err > 0  # MXFP4 moves every GEMM
    out = probe.finish(sums, world_size=1)
    for gemm, (ra, rb) in GEMM_ROLES.items():
        ref, err = want[gemm]
        assert float(out[f"gemm/{gemm}/sqnr_db"]) == pytest.approx(10 * math.log10(ref / err), abs=1e-3)
        assert float(out[f"gemm/{gemm}/rel_error"]) == pytest.approx(math.sqrt(err / ref), rel=1e-4)
        # one operand quantized costs less than both (errors of independent roundings add)
        for role in (ra, rb):
            assert float(out[f"gemm/{gemm}/{role}_sqnr_db"]) > float(out[f"gemm/{gemm}/sqnr_db"])


def test_only_quantized_roles_get_keys():
    """A role kept in high precision has no ``<role>_sqnr_db``; its one-operand error is 0."""
    _, _, layer = converted("mxfp4_e2m1", weight_format=None)
    probe = probe_for(layer)
    x, _ = operands()
    sums = probe.forward_sums(x, layer.weight.detach().float(), gemm=True, scales=True)
    assert float(sums["gemm/fwd/b_err_sq"]) == 0.0
    out = probe.finish(sums, world_size=1)
    assert "gemm/fwd/input_sqnr_db" in out and "gemm/fwd/weight_sqnr_db" not in out
    assert not any(k.startswith("scales/weight/") for k in out)
    assert probe_for(nn.Linear(4, 4)) is None
    _, _, plain = converted("bf16")
    assert probe_for(plain) is None


def test_sums_add_over_micro_batches():
    """Sums of two micro-batches give the statistics of their concatenation (rows are independent
    along K): what the collector's one all-reduce relies on."""
    _, _, layer = converted("mxfp8_e4m3")
    probe = probe_for(layer)
    w = layer.weight.detach().float()
    (x1, _), (x2, _) = operands(1, 32), operands(2, 48)
    a, b = (probe.forward_sums(x, w, gemm=True, scales=True) for x in (x1, x2))
    added = {k: a[k] + b[k] for k in a}
    whole = probe.forward_sums(torch.cat([x1, x2]), w, gemm=True, scales=True)
    for k in whole:
        if k.startswith("scales/weight/"):  # the same W twice: counted twice
            assert torch.equal(added[k], 2 * whole[k]), k
        else:
            assert torch.allclose(added[k].double(), whole[k].double(), rtol=1e-9, atol=0), k


def test_dy_histogram_is_normalised_to_the_global_mean_loss():
    """With W ranks each dY is W x the global-mean-loss gradient; the MX dY scale histogram
    shifts back by log2(W), the error statistics do not move (power-of-two scales)."""
    _, _, layer = converted("mxfp8_e4m3")
    probe = probe_for(layer)
    x, dy = operands()
    w = layer.weight.detach().float()
    one = probe.finish(probe.backward_sums(dy, x, w, gemm=True, scales=True), world_size=1)
    two = probe.finish(probe.backward_sums(2 * dy, x, w, gemm=True, scales=True), world_size=2)
    h1, h2 = one["scales/grad_output/log2_scale_hist"], two["scales/grad_output/log2_scale_hist"]
    assert h1 == h2 and h1["_type"] == "histogram" and sum(h1["values"]) == 64 * 384 // 32
    assert two["scales/input_wgrad/log2_scale_hist"] == one["scales/input_wgrad/log2_scale_hist"]
    for k in one:
        if not k.endswith("_hist"):
            assert float(one[k]) == pytest.approx(float(two[k]), abs=1e-5), k


def test_delayed_probe_records_nothing_and_counts_overflow_against_the_applied_scale():
    """fp8_delayed: the probe quantizes with this step's delayed scale (training=False records no
    amax), and dY overflow is counted against that scale, not a fresh per-tensor one."""
    model, rec, layer = converted("fp8_delayed", amax_history_len=4)
    probe = probe_for(layer)
    x, dy = operands()
    w = layer.weight.detach().float()
    name = f"{LAYER}/grad_output"
    rec.delayed.record_amax(name, torch.tensor(1e-4))  # an earlier step saw a 10x smaller dY
    rec.on_optimizer_step()
    before = rec.delayed.amax_history.clone()
    scale = rec.delayed.scale(name)
    probe.forward_sums(x, w, gemm=True, scales=True)
    probe.backward_sums(dy, x, w, gemm=True, scales=True)
    sums = probe.grad_sums(dy)
    assert torch.equal(rec.delayed.amax_history, before)
    e5m2_max = 57344.0
    assert float(scale) == pytest.approx(e5m2_max / 1e-4)
    # E5M2's top binade has spacing 2^13: RNE rounds |v| >= max + 2^12 (a tie to the even 2^16) past max
    want = int(((dy.abs() * scale) >= e5m2_max + 2**12).sum())
    assert int(sums["num_overflow"]) == want > 0
    # a FormatSpec stand-in (fresh per-tensor scale) would report no overflow at all
    assert probe_for(converted("fp8_current")[2]).grad_sums(dy) is None


def test_stochastic_rounding_probe_leaves_training_generator_alone():
    """NVFP4 (SR on dY, Hadamard wgrad): probes draw from their own generator, so taking
    statistics does not change the training run's random stream, and two probes agree."""
    _, rec, layer = converted("nvfp4")
    x, dy = operands()
    w = layer.weight.detach().float()
    state = {k: v.clone() for k, v in rec.sr.state_dict().items()}
    runs = []
    for _ in range(2):
        probe = probe_for(layer)
        runs.append(probe.backward_sums(dy, x, w, gemm=True, scales=True))
    after = rec.sr.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    e = gemm_errors_from_sums(
        {k.split("/")[-1]: v for k, v in runs[0].items() if k.startswith("gemm/wgrad/")}
    )
    assert 0 < float(e["sqnr_db"]) < float(db_from_sums(torch.tensor(1.0), torch.tensor(1e-9)))


@pytest.mark.parametrize("name", ["nvfp4", "fp8_block"])
def test_2d_weight_tiles_get_block_statistics(name):
    """Under ``weight_2d_blocks`` (the nvfp4 and fp8_block presets) W has square-tile scales:
    ``weight`` and ``weight_dgrad`` are the same tiles, so they log equal values, and they are
    the tile statistics of ``recipes.blockstats`` on W."""
    from recipes.blockstats import block_stats_from_sums, fp8_block_sums, nvfp4_block_sums

    _, rec, layer = converted(name)
    assert rec.cfg.weight_2d_blocks
    probe = probe_for(layer)
    x, dy = operands()
    w = layer.weight.detach().float()
    out = probe.finish({**probe.forward_sums(x, w, gemm=False, scales=True),
                        **probe.backward_sums(dy, x, w, gemm=False, scales=True)}, world_size=1)  # fmt: skip
    want = block_stats_from_sums(nvfp4_block_sums(w, two_d=True) if name == "nvfp4" else
                                 fp8_block_sums(w, block_size=128, two_d=True))  # fmt: skip
    for k, v in want.items():
        assert float(out[f"scales/weight/{k}"]) == float(v), k
        assert float(out[f"scales/weight_dgrad/{k}"]) == float(v), k
    tiles = 384 * 128 // (16 * 16 if name == "nvfp4" else 128 * 128)
    assert sum(out["scales/weight/log2_scale_hist"]["values"]) == tiles
