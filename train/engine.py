"""Build the DeepSpeed engine from the typed config.

The optimizer is a client ``torch.optim.AdamW`` (DeepSpeed's own CPU/fused
Adam would JIT-compile C++ ops on first use) with decoupled weight decay on
matrices only, and the schedule is linear warm-up for ``warmup_frac`` of the
steps then cosine decay to ``min_lr_ratio * lr``. DeepSpeed owns precision
(bf16/fp16 wrappers with FP32 master weights), ZeRO partitioning, gradient
accumulation and clipping.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from train.config import RunConfig
from train.validate import Plan


def warmup_steps(*, max_steps: int, warmup_frac: float) -> int:
    """Optimizer steps of the linear learning-rate warm-up."""
    return int(round(warmup_frac * max_steps))


def lr_lambda(step: int, *, max_steps: int, warmup_frac: float, min_ratio: float) -> float:
    """Multiplier of the peak lr after ``step`` optimizer steps (0-based, as LambdaLR counts)."""
    warmup = warmup_steps(max_steps=max_steps, warmup_frac=warmup_frac)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, *, weight_decay: float) -> list[dict[str, Any]]:
    """Matrices (dim >= 2, embeddings included) decay; norms and biases do not."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    t = cfg.trainer
    return torch.optim.AdamW(
        param_groups(model, weight_decay=t.weight_decay),
        lr=t.lr,
        betas=(t.beta1, t.beta2),
        eps=t.eps,
        foreach=True,
    )


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig) -> torch.optim.lr_scheduler.LambdaLR:
    t, d = cfg.trainer, cfg.debug

    def boost(s: int) -> float:  # LambdaLR's s = optimizer steps done: step s + 1 applies it
        return d.lr_boost if d.lr_boost_at_step and s + 1 >= d.lr_boost_at_step else 1.0

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            boost(s)
            * lr_lambda(s, max_steps=t.max_steps, warmup_frac=t.warmup_frac, min_ratio=t.min_lr_ratio)
        ),
    )


def deepspeed_config(cfg: RunConfig, plan: Plan) -> dict[str, Any]:
    t, p, r = cfg.trainer, cfg.parallel, cfg.recipe
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if p.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    ds: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum_steps,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if p.offload_optimizer:
        ds["zero_force_ds_cpu_optimizer"] = False
    if r.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif r.precision == "fp16":
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": r.loss_scale,
            "initial_scale_power": r.initial_scale_power,
            "loss_scale_window": r.loss_scale_window,
            "hysteresis": r.hysteresis,
            "min_loss_scale": r.min_loss_scale,
        }
    return ds


def init_distributed(device: str, *, timeout_s: int = 600) -> None:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, NCCL on GPU); a collective that
    waits longer than ``timeout_s`` (``launcher.collective_timeout_s``) raises instead of hanging."""
    import logging
    from datetime import timedelta

    import deepspeed

    logging.getLogger("compilers").setLevel(logging.WARNING)  # DeepSpeed's op probes log every gcc call
    if device == "cpu":
        # DeepSpeed's CPU shared-memory all-reduce is an optional speed-up that it
        # JIT-compiles (~1 min) on first init; gloo carries every collective without it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl", verbose=False,
                               timeout=timedelta(seconds=timeout_s))  # fmt: skip


def build_engine(model: nn.Module, cfg: RunConfig, plan: Plan):
    import deepspeed

    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, plan)
    )
    undo_unfused_optimizer_warmup_step(engine)
    if plan.world_size == 1 and cfg.parallel.zero_stage == 0:
        # One rank, no ZeRO: DeepSpeed's gradient all-reduce (flatten, all-reduce over one rank,
        # divide by 1, copy back) is the identity, and costs ~3% of a tiny CPU step. The golden
        # runs (all single-rank ZeRO-0) check that skipping it changes no bit.
        engine.enable_backward_allreduce = False
    return engine


@torch.no_grad()
def undo_unfused_optimizer_warmup_step(engine) -> None:
    """DeepSpeed's ZeRO-0 bf16/fp16 wrapper (FP16_UnfusedOptimizer) creates the
    optimizer state by stepping once on zero gradients. For AdamW that advances
    the step counter (bias correction then shrinks the first real update to
    ~0.74x) and applies one weight-decay step to the FP32 masters. Undo both so
    ZeRO-0 trains like ZeRO-1/2/3 and like a plain PyTorch loop."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    opt = engine.optimizer
    if not isinstance(opt, FP16_UnfusedOptimizer):
        return
    for fp32_group, low_group in zip(opt.fp32_groups, opt.fp16_groups):
        for master, low in zip(fp32_group, low_group):
            master.copy_(low)
    engine.basic_optimizer.state.clear()


def reset_deepspeed_state() -> None:
    """Tear down the process group and DeepSpeed's comm singleton (multirun jobs share a process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    try:
        import deepspeed.comm.comm as ds_comm
        import deepspeed.utils.groups as ds_groups
    except ImportError:
        return
    ds_comm.cdb = None
    # DeepSpeed caches process groups in module globals; a second engine in the
    # same process (Hydra multirun jobs) must not see the destroyed ones.
    for name in (
        "_EXPERT_PARALLEL_GROUP",
        "_EXPERT_PARALLEL_GROUP_RANKS",
        "_EXPERT_DATA_PARALLEL_GROUP",
        "_EXPERT_DATA_PARALLEL_GROUP_RANKS",
        "_ALL_TO_ALL_GROUP",
    ):
        getattr(ds_groups, name).clear()
    for name in (
        "_WORLD_GROUP",
        "_ZERO_PARAM_INTRA_PARALLEL_GROUP",
        "mpu",
        "mesh_device",
        "_TENSOR_MODEL_PARALLEL_GROUP",
        "_MODEL_PARALLEL_GROUP",
        "_DATA_PARALLEL_GROUP",
        "_MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE",
        "_MPU_TENSOR_MODEL_PARALLEL_RANK",
    ):
        if hasattr(ds_groups, name):
            setattr(ds_groups, name, None)


@contextlib.contextmanager
def skip_optimizer_step(engine: Any, skip: bool) -> Iterator[None]:
    """Inside, a boundary ``engine.step()`` takes DeepSpeed's overflow path instead of updating:
    the optimizer's ``step`` does nothing and reports ``overflow``, so the engine zeroes the
    gradients, counts ``engine.skipped_steps`` and does not advance the LR schedule (as for an fp16
    overflow). The same on every ZeRO stage and precision; ``skip=False`` changes nothing."""
    if not skip:
        yield
        return
    opt = engine.optimizer
    had = hasattr(opt, "overflow")
    before = getattr(opt, "overflow", None)
    real_step = opt.step

    def no_update(*args: Any, **kwargs: Any) -> None:  # DeepSpeed's own overflow clean-up
        opt.overflow = True
        opt.zero_grad(set_to_none=True)
        if getattr(opt, "offload_optimizer", False) or getattr(opt, "cpu_offload", False):
            opt.reset_cpu_buffers()
        elif isinstance(getattr(opt, "averaged_gradients", None), dict):
            if "Stage3" in type(opt).__name__:
                opt.averaged_gradients = {}
            else:
                for k in opt.averaged_gradients:
                    opt.averaged_gradients[k] = None

    opt.step = no_update
    try:
        yield
    finally:
        opt.step = real_step
        if had:
            opt.overflow = before
        elif hasattr(opt, "overflow"):
            del opt.overflow
