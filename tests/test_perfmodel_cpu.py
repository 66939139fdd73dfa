"""train.perfmodel.optrace: a step's cost from its dispatch trace (issue 15 item 3).

Hand-computed cases (one Linear's GEMM FLOPs forward and backward, one elementwise op's
bytes and time), the GEMM dtype each recipe kind runs in seen in the trace of one tiny
training step (BF16 for MX: both operands exact in BF16; FP32 for FP8 with FP32 scales), and
``--trace`` bad input as one line, exit 2. The predicted-vs-measured check is the bench
(``python -m bench.perfmodel_cpu``), not a timed test."""

from __future__ import annotations

import json
import os

import pytest
import torch

from train.cli import compose
from train.hwspec import HardwareConfig
from train.perfmodel.__main__ import main
from train.perfmodel.calibrate import write_yaml
from train.perfmodel.optrace import DispatchTrace, StepRunner, cost, init_process, op_time, trace_step

TINY = ["model=tiny", "trainer.global_batch_size=2", "logger=none", "trainer.device=cpu"]


@pytest.fixture(autouse=True, scope="module")
def _no_leaked_topology():
    """``init_process`` exports a one-rank torchrun topology (RANK, WORLD_SIZE, MASTER_PORT, ...)
    into this process's environment for the in-process engines here; restore the environment
    after the module, so later tests' subprocesses do not inherit it (their rendezvous would
    find that port taken: EADDRINUSE). The process group itself stays up."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def toy_hw(**kw) -> HardwareConfig:
    base = dict(name="toy", peak_tflops={"fp32": 1e-3, "bf16": 4e-3}, hbm_gb=8, hbm_tb_s=1e-3,
                gpus_per_node=1, nvlink_domain=1, intra_node_gb_s=1.0, inter_node_gb_s=1.0,
                gemm_efficiency=1.0, mem_efficiency=1.0, kernel_launch_us=5.0)  # fmt: skip
    return HardwareConfig(**{**base, **kw})


def test_one_linear_counts_its_three_gemms_by_hand():
    m, k, n = 8, 64, 32
    lin = torch.nn.Linear(k, n, bias=False)
    x = torch.randn(m, k, requires_grad=True)
    with DispatchTrace() as tr:
        lin(x).sum().backward()
    mms = [op for op in tr.ops if op.kind == "matmul"]
    # forward x W^T, dgrad dY W, wgrad dY^T x: each 2 m k n FLOPs
    assert [op.flops for op in mms] == [2 * m * k * n] * 3
    assert {op.dtype for op in mms} == {"float32"}
    assert sum(op.flops for op in tr.ops) == 3 * 2 * m * k * n  # nothing else counts FLOPs
    hw = toy_hw()
    assert op_time(mms[0], hw) == pytest.approx(2 * m * k * n / 1e9)  # 1 GFLOP/s fp32
    a, b = torch.ones(m, k, dtype=torch.bfloat16), torch.ones(k, n, dtype=torch.bfloat16)
    with DispatchTrace() as bf:
        torch.mm(a, b)
    assert bf.ops[0].dtype == "bfloat16"
    assert op_time(bf.ops[0], hw) == pytest.approx(2 * m * k * n / 4e9)  # at the bf16 rate


def test_elementwise_op_bytes_and_time_by_hand():
    a, b = torch.ones(1000), torch.ones(1000)
    with DispatchTrace() as tr:
        torch.add(a, b)
        a.view(10, 100)
    add, view = tr.ops
    assert add.kind == "memory" and add.bytes == 3 * 1000 * 4  # two reads + one write, FP32
    assert view.kind == "view" and view.bytes == 0
    hw = toy_hw()  # 1 GB/s, 5 us floor
    assert op_time(add, hw) == pytest.approx(12e3 / 1e9)
    assert op_time(view, hw) == pytest.approx(5e-6)  # a view costs one dispatch
    assert op_time(add, toy_hw(hbm_tb_s=1.0)) == pytest.approx(5e-6)  # fast memory: the floor
    pred = cost(tr.ops, hw)
    assert pred["step_time_s"] == pytest.approx(12e-6 + 5e-6) and pred["ops"] == 2


@pytest.mark.parametrize("recipe,gemm,extra", [
    ("mxfp8_e4m3", "bfloat16", []),
    ("fp8_delayed", "bfloat16", []),  # code GEMMs (recipe.emulated_gemm=auto)
    ("fp8_delayed", "float32", ["recipe.emulated_gemm=bf16"]),  # per-tensor FP8 kept on FP32 GEMMs
])  # fmt: skip
def test_the_trace_sees_each_kinds_gemm_dtype(recipe, gemm, extra):
    init_process()
    runner = StepRunner(compose([*TINY, f"+recipe={recipe}", "recipe.compile=false", *extra]))
    ops = trace_step(runner, warmup=0)
    mm = [op for op in ops if op.op in ("aten.mm.default", "aten.addmm.default")]
    # tiny: 2 blocks x 4 converted Linear x 3 GEMMs in the recipe's dtype; lm_head stays BF16
    assert sum(op.dtype == gemm for op in mm) >= 2 * 4 * 3, sorted({(o.op, o.dtype) for o in mm})
    assert any(op.op.startswith("aten._scaled_dot_product") for op in ops)  # attention in the engine
    assert any(op.op.startswith("aten._foreach") or "adam" in op.op for op in ops) or len(ops) > 500


def test_trace_cli_prints_a_prediction(tmp_path, capsys):
    hw_file = write_yaml(
        toy_hw(peak_tflops={"fp32": 0.05, "bf16": 0.1}, hbm_tb_s=0.01),
        {"peak_tflops": "toy"},
        tmp_path / "hw.yaml",
    )
    out = tmp_path / "trace.json"
    assert main(["--trace", "--hardware-file", str(hw_file), "--out", str(out), *TINY]) == 0
    assert "predicted step" in capsys.readouterr().out
    pred = json.loads(out.read_text())
    assert pred["step_time_s"] > 0 and pred["matmul_flops"] > 0 and pred["hardware"] == "toy"


@pytest.mark.parametrize("args,key", [(["--trace", "model=tiny"], "--trace"),
                                      (["--trace", "--hardware-file", "/no/such.yaml", "model=tiny"], "--hardware-file"),
                                      (["--trace", "-m", "--hardware-file", "x.yaml", "model=tiny"], "--trace"),
                                      (["--trace", "--hardware-file", "x.yaml", "model=tiny", "hardware=h100"], "--trace")])  # fmt: skip
def test_trace_bad_flags_are_one_line_exit_2(args, key, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lowbit: config error: {key}="), err
