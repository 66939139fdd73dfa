"""A step's cost from its ops: one training step traced op by op, each op costed at calibrated rates.

``python -m train.perfmodel --trace --hardware-file outputs/hardware/cpu.yaml OVERRIDES`` builds
the trainer's engine for the composed config (``build_model`` -> ``recipe.resolve`` ->
``recipe.convert`` -> ``train.engine.build_engine``, as ``bench/recipe_step.py``), runs one
untimed warm-up step, then ONE step (forward, backward, optimizer, the recipe's hooks) under a
``TorchDispatchMode`` that records every aten op with its inputs' and outputs' shapes and
dtypes. Nothing of lowbit's own steps is timed: the cost of each op comes from the hardware
spec alone (``--calibrate``'s measured rates, or a preset's peaks x its efficiencies):

* matmul-like ops (``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``_scaled_mm``, every
  ``_scaled_dot_product_*`` attention and its backward, ``convolution``): FLOPs / the matmul
  rate of the dtype they run in (BF16 at the ``bf16`` rate, FP32 at ``fp32``), at least one
  dispatch latency; attention as fused kernels do it (``4 B H Sq Sk D`` forward, 2.5x that
  backward, halved when causal);
* every other op: ``max(bytes read + written / memory bandwidth, dispatch latency)``, a view
  (``OpOverload.is_view``) moving no bytes;

summed over the step. So an emulated recipe costs what its quantize / dequantize ops and its
FP32 or BF16 GEMMs cost, counted, with no constant fitted to any measured step. What it leaves
out: Python time between ops beyond the one dispatch latency each (the autograd engine, the
recipe's and DeepSpeed's own Python), cache effects (every byte at the streaming bandwidth, an
op's inputs counted once per read), threads idle in small ops.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from recipes.errors import ConfigError
from train.config import RunConfig
from train.hwspec import HardwareConfig, rate_family

#: dtype -> the hardware spec's GEMM family whose rate a matmul in that dtype runs at
DTYPE_FAMILY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                torch.float8_e4m3fn: "fp8", torch.float8_e5m2: "fp8", torch.int8: "int8"}  # fmt: skip
MATMULS = ("mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "convolution")


@dataclass
class OpRecord:
    """One dispatched aten op of the traced step."""

    op: str
    """``aten.<name>.<overload>``."""
    kind: str
    """``matmul`` (FLOPs-bound at a dtype's rate), ``memory`` (bytes-bound) or ``view`` (no bytes)."""
    dtype: str
    in_shapes: list[tuple[int, ...]]
    out_shapes: list[tuple[int, ...]]
    flops: float
    bytes: float


def _tensors(x: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(x) if isinstance(t, torch.Tensor)]


def _bound_args(func: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    names = [a.name for a in func._schema.arguments]
    return {**dict(zip(names, args)), **kwargs}


def attention_flops(named: dict[str, Any], *, backward: bool) -> float:
    """Fused attention: ``QK^T`` and ``PV`` (``2 x 2 B H Sq Sk D``) forward; the backward
    recomputes ``QK^T`` and does four more (2.5x); causal does half of the ``Sq x Sk`` square."""
    q, k = named["query"], named["key"]
    flops = 4.0 * math.prod(q.shape[:-1]) * k.shape[-2] * q.shape[-1]
    if named.get("is_causal"):
        flops /= 2
    return flops * (2.5 if backward else 1.0)


def matmul_flops(name: str, func: Any, args: tuple, kwargs: dict, out: Any) -> float | None:
    """FLOPs of a matmul-like op (2 per multiply-add), or None for any other op."""
    if "_scaled_dot_product" in name:
        return attention_flops(_bound_args(func, args, kwargs), backward="backward" in name)
    if name not in MATMULS:
        return None
    t = _tensors(args)
    if name in ("mm", "_scaled_mm"):
        a, b = t[0], t[1]
    elif name == "addmm" or name == "baddbmm":
        a, b = t[1], t[2]
    elif name == "bmm":
        a, b = t[0], t[1]
    else:  # convolution: 2 x outputs x (input channels / groups) x kernel elements
        w, o = t[1], _tensors(out)[0]
        return 2.0 * o.numel() * math.prod(w.shape[1:])
    return 2.0 * math.prod(a.shape) * b.shape[-1]


class DispatchTrace(TorchDispatchMode):
    """Record every aten op (shapes, dtypes, FLOPs or bytes) while it runs; time nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[OpRecord] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append(record(func, args, kwargs, out))
        return out


def record(func: Any, args: tuple, kwargs: dict, out: Any) -> OpRecord:
    name = func.overloadpacket.__name__
    ins, outs = _tensors((args, kwargs)), _tensors(out)
    flops = matmul_flops(name, func, args, kwargs, out)
    floats = [t for t in ins if t.is_floating_point()] or ins or outs
    dtype = str(floats[0].dtype).replace("torch.", "") if floats else "-"
    if flops is not None:
        kind = "matmul"
        q = _bound_args(func, args, kwargs).get("query") if "_scaled_dot_product" in name else None
        dtype = str(q.dtype).replace("torch.", "") if isinstance(q, torch.Tensor) else dtype
    else:
        kind = "view" if getattr(func, "is_view", False) else "memory"
    nbytes = 0.0 if kind == "view" else float(sum(t.numel() * t.element_size() for t in ins + outs))
    return OpRecord(op=str(func), kind=kind, dtype=dtype, in_shapes=[tuple(t.shape) for t in ins],
                    out_shapes=[tuple(t.shape) for t in outs], flops=float(flops or 0.0), bytes=nbytes)  # fmt: skip


def op_time(op: OpRecord, hw: HardwareConfig) -> float:
    """Seconds of one traced op on ``hw`` (see the module docstring)."""
    latency = hw.kernel_launch_us * 1e-6
    if op.kind == "matmul":
        fam = DTYPE_FAMILY.get(getattr(torch, op.dtype, None), "fp32")  # type: ignore[arg-type]
        rate = rate_family(hw, fam) or ("fp32" if "fp32" in hw.peak_tflops else None)
        if rate is None:
            raise ConfigError(f"hardware.peak_tflops.{fam}", None,
                              f"the traced step runs {op.dtype} matmuls; use a spec with that rate "
                              "(python -m train.perfmodel --calibrate writes one)")  # fmt: skip
        return max(op.flops / (hw.peak_tflops[rate] * 1e12 * hw.gemm_efficiency), latency)
    return max(op.bytes / (hw.hbm_tb_s * 1e12 * hw.mem_efficiency), latency)


def cost(ops: list[OpRecord], hw: HardwareConfig) -> dict[str, Any]:
    """The predicted step: total seconds, by kind and dtype, and the costliest ops."""
    by_kind: dict[str, float] = defaultdict(float)
    by_op: dict[str, dict[str, float]] = defaultdict(
        lambda: {"count": 0, "s": 0.0, "flops": 0.0, "bytes": 0.0}
    )
    latency_bound = 0
    for op in ops:
        t = op_time(op, hw)
        key = f"{op.kind} {op.dtype}" if op.kind == "matmul" else op.kind
        by_kind[key] += t
        if t <= hw.kernel_launch_us * 1e-6:
            latency_bound += 1
        row = by_op[f"{op.op} [{op.dtype}]"]
        row["count"] += 1
        row["s"] += t
        row["flops"] += op.flops
        row["bytes"] += op.bytes
    total = sum(by_kind.values())
    top = sorted(by_op.items(), key=lambda kv: -kv[1]["s"])
    return {"step_time_s": total, "ops": len(ops), "latency_bound_ops": latency_bound,
            "time_by_kind_s": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "matmul_flops": sum(o.flops for o in ops), "bytes": sum(o.bytes for o in ops),
            "top_ops": [{"op": k, **v} for k, v in top[:15]], "hardware": hw.name}  # fmt: skip


class StepRunner:
    """The trainer's engine for one config, with the step ``bench/recipe_step.py`` times."""

    def __init__(self, cfg: RunConfig, *, seed: int = 0) -> None:
        from recipes.base import get_recipe
        from train.data import nominal_vocab_size
        from train.engine import build_engine
        from train.model import build_model
        from train.validate import validate

        plan = validate(cfg, world_size=1)
        self.recipe = get_recipe(cfg.recipe)
        self.recipe.resolve(plan.device)
        model_cfg = cfg.model.resolve(nominal_vocab_size(cfg.data))
        model = build_model(model_cfg, seed=cfg.trainer.seed)
        self.recipe.convert(model)
        self.engine = build_engine(model, cfg, plan)
        self.accum = plan.grad_accum_steps
        g = torch.Generator().manual_seed(seed)
        shape = (plan.micro_batch_size, cfg.model.seq_len)
        vocab = min(256, model_cfg.vocab_size or 256)
        self.x = torch.randint(0, vocab, shape, generator=g).to(plan.device)
        self.y = torch.randint(0, vocab, shape, generator=g).to(plan.device)

    def step(self) -> None:
        """One optimizer step: every micro-batch's forward and backward, then the update."""
        for _ in range(self.accum):
            with self.recipe.forward_context():
                loss = self.engine(self.x, self.y)
            self.engine.backward(loss)
            self.recipe.on_micro_batch()
            self.engine.step()
        self.recipe.on_optimizer_step()
        if self.x.is_cuda:
            torch.cuda.synchronize()


def init_process() -> None:
    """One rank of torch.distributed (gloo on CPU), as the trainer and the bench set it up."""
    import torch.distributed as dist

    from train import distenv
    from train.engine import init_distributed

    if not (dist.is_available() and dist.is_initialized()):
        distenv.export(distenv.detect())
        init_distributed("cpu" if not torch.cuda.is_available() else "cuda")


def trace_step(runner: StepRunner, *, warmup: int = 1) -> list[OpRecord]:
    """``warmup`` untimed steps (optimizer state, lazy buffers), then one step traced."""
    for _ in range(warmup):
        runner.step()
    with DispatchTrace() as tr:
        runner.step()
    return tr.ops


def predict_traced(cfg: RunConfig, hw: HardwareConfig, *, warmup: int = 1) -> dict[str, Any]:
    """Build the engine for ``cfg``, trace one step, cost it on ``hw``."""
    init_process()
    runner = StepRunner(cfg)
    pred = cost(trace_step(runner, warmup=warmup), hw)
    pred["tokens_per_step"] = runner.accum * runner.x.numel()
    return pred


def render(pred: dict[str, Any], label: str) -> str:
    lines = [f"perfmodel --trace: {label} on {pred['hardware']}: {pred['ops']} aten ops in one step "
             f"({pred['latency_bound_ops']} at the dispatch-latency floor), {pred['matmul_flops'] / 1e9:.1f} "
             f"GFLOP in matmuls, {pred['bytes'] / 1e9:.2f} GB moved by the rest", "",
             f"{'op [dtype]':<58} {'count':>7} {'GFLOP':>9} {'GB':>8} {'time':>11}"]  # fmt: skip
    for r in pred["top_ops"]:
        lines.append(f"{r['op']:<58} {int(r['count']):>7} {r['flops'] / 1e9:>9.2f} {r['bytes'] / 1e9:>8.3f} "
                     f"{r['s'] * 1e3:>8.1f} ms")  # fmt: skip
    kinds = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in pred["time_by_kind_s"].items())
    lines += ["", f"by kind: {kinds}", f"predicted step {pred['step_time_s'] * 1e3:.1f} ms "
              f"({pred['tokens_per_step']:,} tokens)"]  # fmt: skip
    return "\n".join(lines)
