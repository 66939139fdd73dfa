"""A whole predicted step: components, overlap, memory per GPU, and the summary.

Overlap assumption (``overlap="hidden"``, the default): a collective hides behind the compute
of the phase it runs in (DeepSpeed's ``overlap_comm``-style bucketing, ZeRO-3 prefetch); only
the part longer than that phase is exposed: ZeRO-3's forward all-gather behind one micro-batch's
forward, the backward all-gather and reduce-scatter behind its backward, stage 0/1's one
gradient reduction behind the last micro-batch's backward. The parameter all-gather after the
optimizer step (ZeRO-1/2) and the FP8 amax all-reduce are exposed. ``overlap="none"`` exposes
every collective. Contention of communication with compute for memory bandwidth and SMs is not
modelled.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from typing import Any

import torch

from recipes.base import Recipe, iter_linears
from recipes.errors import ConfigError
from train.config import RunConfig
from train.data import nominal_vocab_size
from train.hwspec import HardwareConfig
from train.perfmodel import roofline as rl
from train.perfmodel.step import Component, collectives, compute_components, peak_for
from train.telemetry.perf import flops_per_token, gemm_params

OVERLAPS = ("hidden", "none")


def batch_layout(cfg: RunConfig, *, world: int) -> tuple[int, int]:
    """(micro-batch per GPU, accumulation steps), as ``train.validate`` resolves them."""
    t = cfg.trainer
    micro = t.micro_batch_size or t.global_batch_size // world
    if micro < 1 or t.global_batch_size % (micro * world):
        raise ConfigError("trainer.global_batch_size", t.global_batch_size,
                          f"must be a multiple of micro-batch x GPUs ({micro} x {world} = {micro * world})")  # fmt: skip
    return micro, t.global_batch_size // (micro * world)


def _model(cfg: RunConfig, recipe: Recipe) -> tuple[Any, list[tuple[str, int, int]], set[str], int]:
    from train.model import GPT, count_params

    mc = cfg.model.resolve(nominal_vocab_size(cfg.data))
    with torch.device("meta"):
        model = GPT(mc)
    linears = [(n, mod.weight.shape[0], mod.weight.shape[1]) for n, mod in iter_linears(model)]
    num_params = count_params(model)
    recipe.resolve("cpu")
    recipe.check(model)
    converted = set(recipe.convert(model).converted)
    return mc, linears, converted, num_params


def memory_per_gpu(cfg: RunConfig, mc: Any, *, num_params: int, world: int, micro: int, recipe: Recipe,
                   linears: list[tuple[str, int, int]], converted: set[str]) -> dict[str, Any]:  # fmt: skip
    """Bytes per GPU: ZeRO-partitioned states, Korthikanti activations (with and without
    checkpointing; ``trainer.activation_checkpointing`` picks the one counted), the FP32 logits,
    and the recipe's cached weight copies with their scales (ZeRO-3: the largest layer's)."""
    stage = cfg.parallel.zero_stage
    states = rl.zero_memory(num_params, stage=stage, dp=world)
    f = mc.ffn_dim
    shape = dict(layers=mc.n_layers, seq=mc.seq_len, batch=micro, d_model=mc.d_model, ffn=f,
                 fc_out=2 * f if mc.mlp == "swiglu" else f)  # fmt: skip
    act = {ck: rl.activation_memory(**shape, checkpointing=ck) for ck in (False, True)}
    logits = mc.seq_len * micro * (mc.vocab_size or 0) * (2 + 4)
    weight_casts = [c for c in recipe.operand_casts() if c.tensor == "W"]
    copies = [sum(c.stored_bytes(n * k, k if c.gemm == "fwd" else n) for c in weight_casts)
              for name, n, k in linears if name in converted]  # fmt: skip
    copy_bytes = (max(copies) if stage >= 3 else sum(copies)) if copies else 0.0
    ck = cfg.trainer.activation_checkpointing
    total = sum(states.values()) + act[ck] + logits + copy_bytes
    return {**states, "activations": act[ck], "activations_no_checkpointing": act[False],
            "activations_checkpointing": act[True], "logits": logits, "recipe_weight_copies": copy_bytes,
            "total": total}  # fmt: skip


def exposed_comm(comps: list[Component], *, overlap: str) -> float:
    """Seconds of communication not hidden (module docstring); each collective's share is
    recorded in its ``detail["exposed_s"]``."""
    per_mb = {ph: sum(c.time_s for c in comps if c.phase == ph and c.kind != "comm") for ph in ("fwd", "bwd")}
    hidden_by = {"fwd": per_mb["fwd"], "bwd": per_mb["bwd"], "last_bwd": per_mb["bwd"], "none": 0.0}
    total = 0.0
    for c in comps:
        if c.kind != "comm":
            continue
        behind = 0.0 if overlap == "none" else hidden_by[c.detail["overlaps"]]
        c.detail["exposed_s"] = max(0.0, c.time_s - behind) * c.count
        total += c.detail["exposed_s"]
    return total


def group(name: str) -> str:
    """A component's name without its block index (``blocks.*.mlp.fc fwd``) and, for a cast,
    without its layer (``cast x (fwd)``: summed over the converted Linears)."""
    name = re.sub(r"^blocks\.\d+", "blocks.*", name)
    return re.sub(r"^\S+ (cast .*)$", r"\1", name)


def predict_step(cfg: RunConfig, hw: HardwareConfig, recipe: Recipe, *, nodes: int, overlap: str = "hidden") -> dict[str, Any]:  # fmt: skip
    """The predicted step of ``cfg`` under ``recipe`` on ``nodes`` x ``launcher.nproc_per_node`` GPUs."""
    per_node = cfg.launcher.nproc_per_node
    if per_node > hw.gpus_per_node:
        raise ConfigError(
            "launcher.nproc_per_node", per_node, f"{hw.name} nodes hold {hw.gpus_per_node} GPUs"
        )
    if nodes < 1:
        raise ConfigError("nodes", nodes, "at least 1")
    if overlap not in OVERLAPS:
        raise ConfigError("--overlap", overlap, f"use one of: {', '.join(OVERLAPS)}")
    p = cfg.parallel
    if p.offload_optimizer or p.offload_param:
        raise ConfigError(
            "parallel.offload_optimizer", True, "CPU offload is not modelled; use parallel=zero3"
        )
    world = nodes * per_node
    micro, accum = batch_layout(cfg, world=world)
    mc, linears, converted, num_params = _model(cfg, recipe)
    comps = compute_components(mc, linears, converted, recipe=recipe, hw=hw, micro_batch=micro, accum=accum,
                               checkpointing=cfg.trainer.activation_checkpointing)  # fmt: skip
    stage = p.zero_stage
    shard = world if stage >= 2 else 1
    acc = rl.memory_pass(10.0 * num_params / shard, hw=hw)  # bf16 grad read, fp32 buffer read + write
    comps.append(
        Component(
            "gradient accumulation (FP32)", "optimizer", "bwd", acc.bound, acc.time_s, accum, 0.0, acc.bytes
        )
    )
    opt = rl.memory_pass(30.0 * num_params / (world if stage >= 1 else 1), hw=hw)  # fmt: skip
    comps.append(Component("AdamW step (FP32 master, m, v; BF16 copy)", "optimizer", "step", opt.bound, opt.time_s, 1, 0.0, opt.bytes))  # fmt: skip
    amax = {(name, c.tensor) for name, *_ in linears if name in converted for c in recipe.operand_casts() if c.amax_allreduce}  # fmt: skip
    comms = collectives(num_params, stage=stage, world=world, hw=hw, accum=accum, num_amax=len(amax))
    comps += comms
    compute_s = sum(c.total_s for c in comps if c.kind != "comm")
    exposed = exposed_comm(comps, overlap=overlap)
    step_s = compute_s + exposed
    mem = memory_per_gpu(cfg, mc, num_params=num_params, world=world, micro=micro, recipe=recipe,
                         linears=linears, converted=converted)  # fmt: skip
    mem["fits"] = mem["total"] <= hw.hbm_gb * 1e9
    vocab = mc.vocab_size or 0
    tokens = cfg.trainer.global_batch_size * mc.seq_len
    tok_s_gpu = tokens / step_s / world
    palm = flops_per_token(mc, vocab_size=vocab, seq_len=mc.seq_len)  # the trainer's MFU count
    causal = flops_per_token(mc, vocab_size=vocab, seq_len=mc.seq_len, causal_attention=True)
    fmt_family = recipe.gemm_family()
    rate, fmt_peak = peak_for(hw, fmt_family)
    by_kind: dict[str, float] = {}
    for c in comps:
        if c.kind != "comm":
            by_kind[c.kind] = by_kind.get(c.kind, 0.0) + c.total_s
    by_kind["comm (exposed)"] = exposed
    by_group: dict[str, float] = {}
    for c in comps:
        by_group[group(c.name)] = by_group.get(group(c.name), 0.0) + c.total_s
    gemm_flops = sum(c.flops * c.count for c in comps if c.kind == "gemm")
    attn_flops = sum(c.flops * c.count for c in comps if c.kind == "attention")
    summary = {
        "recipe": recipe.name, "model": mc.name, "num_params": num_params, "hardware": hw.name, "gpus": world, "nodes": nodes, "gpus_per_node": per_node,
        "zero_stage": stage, "micro_batch": micro, "grad_accum_steps": accum, "tokens_per_step": tokens,
        "step_time_s": step_s, "compute_time_s": compute_s, "comm_exposed_s": exposed,
        "comm_total_s": sum(c.total_s for c in comms), "tokens_per_s": tokens / step_s,
        "tokens_per_s_per_gpu": tok_s_gpu, "flops_per_token": palm, "flops_per_token_causal": causal,
        "mfu_bf16_peak": tok_s_gpu * palm / (hw.peak_tflops["bf16"] * 1e12),
        "mfu_format_peak": tok_s_gpu * palm / (fmt_peak * 1e12), "format_family": fmt_family,
        "format_peak_family": rate, "format_emulated_as": None if rate == fmt_family else rate,
        "memory_per_gpu_gb": mem["total"] / 1e9, "fits_in_hbm": mem["fits"],
        "top_bottleneck": max(by_kind, key=lambda k: by_kind[k]), "time_by_kind_s": by_kind,
        "top_components": sorted(by_group.items(), key=lambda kv: -kv[1])[:5],
        "gemm_flops_per_token": gemm_flops / tokens, "attention_flops_per_token": attn_flops / tokens,
        "linear_gemm_flops_match": gemm_flops == 6 * gemm_params(mc, vocab_size=vocab) * tokens,
        "converted_linears": len(converted), "linears": len(linears), "overlap": overlap,
    }  # fmt: skip
    return {"summary": summary, "memory_bytes": mem, "hardware": asdict(hw),
            "components": [c.to_json() for c in comps]}  # fmt: skip
