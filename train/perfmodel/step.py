"""One training step as a list of timed components (``Component``), from the model's Linear
layers, the recipe's per-GEMM families and casts, and the hardware spec.

Per micro-batch of ``M = micro_batch_size x seq_len`` tokens and per Linear ``W:[N,K]``: the
three GEMMs (fwd ``[M,K]x[K,N]``, dgrad ``[M,N]x[N,K]``, wgrad ``[N,M]x[M,K]``) at the rate of
``Recipe.gemm_families()`` on this chip (``train.hwspec.rate_family``: a family the chip lacks
runs at the next-best one, marked ``emulated_as``); the recipe's operand casts
(``Recipe.operand_casts()``: weight copies once per step, as the trainer caches them between
optimizer steps; activation and gradient copies per micro-batch); fused attention; the
norms, residual adds, activation, RoPE, embedding and loss passes (memory-bound; a backward
moves twice its forward's bytes); the FP32 gradient accumulation; per block recompute under
``trainer.activation_checkpointing``. Per step: the AdamW update and the collectives of
``parallel.zero_stage`` (``collectives``). FLOPs per token are ``flops_per_token``'s
(``train.telemetry.perf``), causal attention counted as SDPA ``is_causal`` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from recipes.base import Recipe
from recipes.costs import OperandCast
from recipes.errors import ConfigError
from train.config import ModelConfig
from train.hwspec import FAMILY_BITS, HardwareConfig, rate_family
from train.perfmodel import roofline as rl
from train.telemetry.perf import flops_per_token, gemm_params

#: per role field: (numel, reduction length) of its tensor for a Linear, from (M, N, K)
ROLE_SHAPE = {
    "input_format": lambda m, n, k: (m * k, k),
    "weight_format": lambda m, n, k: (n * k, k),
    "grad_output_dgrad_format": lambda m, n, k: (m * n, n),
    "weight_dgrad_format": lambda m, n, k: (n * k, n),
    "grad_output_wgrad_format": lambda m, n, k: (m * n, m),
    "input_wgrad_format": lambda m, n, k: (m * k, m),
}
#: per GEMM: its (m, k, n) from the Linear's (M, N, K) and its two role fields
GEMM_SHAPE = {
    "fwd": (lambda m, n, k: (m, k, n), ("input_format", "weight_format")),
    "dgrad": (lambda m, n, k: (m, n, k), ("grad_output_dgrad_format", "weight_dgrad_format")),
    "wgrad": (lambda m, n, k: (n, m, k), ("grad_output_wgrad_format", "input_wgrad_format")),
}


@dataclass
class Component:
    name: str
    kind: str
    """gemm | cast | attention | elementwise | recompute | optimizer | comm"""
    phase: str
    """fwd | bwd (per micro-batch) | step (once per optimizer step)"""
    bound: str
    time_s: float
    """One occurrence."""
    count: int = 1
    """Occurrences per optimizer step."""
    flops: float = 0.0
    bytes: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        return self.time_s * self.count

    def to_json(self) -> dict[str, Any]:
        intensity = self.flops / self.bytes if self.bytes and self.flops else None
        return {"name": self.name, "kind": self.kind, "phase": self.phase, "bound": self.bound,
                "time_s": self.time_s, "count": self.count, "total_s": self.total_s, "flops": self.flops,
                "bytes": self.bytes, "arithmetic_intensity": intensity, **self.detail}  # fmt: skip


def _comp(name: str, kind: str, phase: str, r: rl.Roofline, count: int, **detail: Any) -> Component:
    return Component(name, kind, phase, r.bound, r.time_s, count, r.flops, r.bytes, detail)


def peak_for(hw: HardwareConfig, family: str, *, key: str = "recipe") -> tuple[str, float]:
    """(rate family, its peak) of a GEMM of ``family`` on ``hw``; ConfigError when none fits."""
    rate = rate_family(hw, family)
    if rate is None:
        raise ConfigError(f"hardware.peak_tflops.{family}", None,
                          f"{hw.name} has no {family} rate for this {key}'s GEMMs; add one to its YAML")  # fmt: skip
    return rate, hw.peak_tflops[rate]


def linear_gemms(
    name: str, n: int, k: int, *, m: int, recipe: Recipe, converted: bool, hw: HardwareConfig, accum: int
) -> list[Component]:
    """The three GEMMs and (converted) the operand casts of one Linear ``W:[n,k]`` on ``m`` tokens."""
    engine = recipe.precision
    families = recipe.gemm_families() if converted else dict.fromkeys(GEMM_SHAPE, engine)
    casts: dict[str, OperandCast] = {c.role: c for c in recipe.operand_casts()} if converted else {}
    out = []
    for gemm, (shape, roles) in GEMM_SHAPE.items():
        want = families[gemm]
        rate, peak = peak_for(hw, want)
        bits, scale_bytes = [], 0.0
        for role in roles:
            cast = casts.get(role)
            if want == engine or cast is None:  # the GEMM runs on high-precision operands
                bits.append(FAMILY_BITS[rate])
                continue
            numel, reduce = ROLE_SHAPE[role](m, n, k)
            bits.append(min(cast.element_bits, FAMILY_BITS[rate]) if rate == want else FAMILY_BITS[rate])
            scale_bytes += cast.num_scales(numel, reduce) * cast.scale_bytes
        gm, gk, gn = shape(m, n, k)
        moved = rl.gemm_bytes(gm, gk, gn, a_bits=bits[0], b_bits=bits[1], scale_bytes=scale_bytes)
        r = rl.gemm(gm, gk, gn, peak_tflops=peak, bytes_moved=moved, hw=hw)
        out.append(_comp(f"{name} {gemm}", "gemm", "fwd" if gemm == "fwd" else "bwd", r, accum,
                         shape=[gm, gk, gn], family=want, emulated_as=None if rate == want else rate,
                         peak_tflops=peak))  # fmt: skip
    for role, cast in casts.items():
        numel, reduce = ROLE_SHAPE[role](m, n, k)
        read, written = cast.pass_bytes(numel, reduce)
        r = rl.memory_pass(read + written, hw=hw, kernels=2 if cast.amax_pass else 1)
        once = cast.tensor == "W"  # weight casts are cached for the step
        out.append(_comp(f"{name} cast {cast.tensor} ({cast.gemm})", "cast", "fwd" if cast.gemm == "fwd" else "bwd",
                         r, 1 if once else accum, read_bytes=read, written_bytes=written, layout=cast.layout,
                         block=cast.block, scale_bytes=cast.num_scales(numel, reduce) * cast.scale_bytes,
                         element_bits=cast.element_bits, per="step" if once else "micro_batch"))  # fmt: skip
    return out


def layer_passes(layer: int, mc: ModelConfig, *, m: int, attn_flops_tok: float, hw: HardwareConfig,
                 engine_peak: float, engine_family: str, accum: int) -> list[Component]:  # fmt: skip
    """Fused attention and the memory-bound passes of one block on ``m`` tokens."""
    d, f, b = mc.d_model, mc.ffn_dim, rl.BF16
    fc_out = 2 * f if mc.mlp == "swiglu" else f
    p = f"blocks.{layer}"
    attn_fwd = rl.attention(m * attn_flops_tok / 3, 4 * m * d * b, peak_tflops=engine_peak, hw=hw)
    attn_bwd = rl.attention(2 * m * attn_flops_tok / 3, 8 * m * d * b, peak_tflops=engine_peak, hw=hw)
    # 2 norms (r+w), 2 residual adds (2r+w), the activation (fc_out read, F written), RoPE on q, k
    fwd_bytes = b * m * (2 * 2 * d + 2 * 3 * d + fc_out + f + (8 * d if mc.pos == "rope" else 0))
    kernels = 5 + (1 if mc.pos == "rope" else 0)
    return [
        _comp(f"{p}.attn.sdpa fwd", "attention", "fwd", attn_fwd, accum, family=engine_family),
        _comp(f"{p}.attn.sdpa bwd", "attention", "bwd", attn_bwd, accum, family=engine_family),
        _comp(f"{p} norms+residual+act fwd", "elementwise", "fwd", rl.memory_pass(fwd_bytes, hw=hw, kernels=kernels), accum),
        _comp(f"{p} norms+residual+act bwd", "elementwise", "bwd",
              rl.memory_pass(2 * fwd_bytes, hw=hw, kernels=kernels), accum),
    ]  # fmt: skip


def model_passes(mc: ModelConfig, *, m: int, vocab: int, hw: HardwareConfig, accum: int) -> list[Component]:
    """Embedding, final norm and the FP32 cross-entropy over the logits (``train.model``)."""
    d, b = mc.d_model, rl.BF16
    emb = b * m * d * (2 + (3 if mc.pos == "learned" else 0)) + 4 * b * m * d
    loss_fwd, loss_bwd = m * vocab * (2 + 4 + 4), m * vocab * (4 + 4 + 2)  # bf16->fp32, softmax
    return [
        _comp("embedding+norm+loss fwd", "elementwise", "fwd", rl.memory_pass(emb + loss_fwd, hw=hw, kernels=4), accum),
        _comp("embedding+norm+loss bwd", "elementwise", "bwd",
              rl.memory_pass(2 * emb + loss_bwd, hw=hw, kernels=4), accum),
    ]  # fmt: skip


def compute_components(
    mc: ModelConfig, linears: list[tuple[str, int, int]], converted: set[str], *, recipe: Recipe,
    hw: HardwareConfig, micro_batch: int, accum: int, checkpointing: bool,
) -> list[Component]:  # fmt: skip
    """Every GEMM, cast and memory-bound pass of one step (module docstring)."""
    vocab = mc.vocab_size or 0
    m = micro_batch * mc.seq_len
    n_gemm = gemm_params(mc, vocab_size=vocab)
    attn_tok = flops_per_token(mc, vocab_size=vocab, seq_len=mc.seq_len, causal_attention=True) - 6 * n_gemm
    attn_tok_layer = attn_tok / mc.n_layers
    engine_family, engine_peak = peak_for(hw, recipe.precision)
    out: list[Component] = []
    for name, n, k in linears:
        out += linear_gemms(name, n, k, m=m, recipe=recipe, converted=name in converted, hw=hw, accum=accum)
    for layer in range(mc.n_layers):
        out += layer_passes(layer, mc, m=m, attn_flops_tok=attn_tok_layer, hw=hw, engine_peak=engine_peak, engine_family=engine_family,
                            accum=accum)  # fmt: skip
    out += model_passes(mc, m=m, vocab=vocab, hw=hw, accum=accum)
    if checkpointing:  # each block's forward runs again inside the backward
        again = [c for c in out if c.phase == "fwd" and c.name.startswith("blocks.") and c.count == accum]
        t = sum(c.time_s for c in again)
        out.append(Component("recompute (activation checkpointing)", "recompute", "bwd", "mixed", t, accum,
                             sum(c.flops for c in again), sum(c.bytes for c in again)))  # fmt: skip
    return out


def collectives(
    num_params: int,
    *,
    stage: int,
    world: int,
    hw: HardwareConfig,
    accum: int,
    num_amax: int,
    grad_bytes: int = 4,
) -> list[Component]:
    """The data-parallel collectives of one step (ring formulas, ``roofline.ring``): gradients
    reduced in FP32 (``recipes.quantized``: "FP32 gradient reduction under ZeRO"), parameters
    gathered in BF16. Stage 0: one all-reduce at the accumulation boundary; 1: reduce-scatter
    there and an all-gather of the updated parameters; 2: reduce-scatter per micro-batch and
    that all-gather; 3: all-gather per micro-batch in forward and again in backward, reduce-
    scatter per micro-batch. ``detail.overlaps``: the phase it can hide behind."""
    if world <= 1:
        return []
    g, w = grad_bytes * num_params, rl.BF16 * num_params

    def c(name: str, kind: str, size: float, count: int, overlaps: str) -> Component:
        r = rl.ring(kind, size, num_gpus=world, hw=hw)
        return _comp(name, "comm", "step", r, count, collective=kind, buffer_bytes=size, overlaps=overlaps,
                     link_gb_s=rl.link_gb_s(hw, num_gpus=world))  # fmt: skip

    out = {
        0: [c("gradient all-reduce", "all_reduce", g, 1, "last_bwd")],
        1: [c("gradient reduce-scatter", "reduce_scatter", g, 1, "last_bwd"),
            c("parameter all-gather (after the step)", "all_gather", w, 1, "none")],
        2: [c("gradient reduce-scatter", "reduce_scatter", g, accum, "bwd"),
            c("parameter all-gather (after the step)", "all_gather", w, 1, "none")],
        3: [c("parameter all-gather (forward)", "all_gather", w, accum, "fwd"),
            c("parameter all-gather (backward)", "all_gather", w, accum, "bwd"),
            c("gradient reduce-scatter", "reduce_scatter", g, accum, "bwd")],
    }[min(stage, 3)]  # fmt: skip
    if num_amax:
        out.append(c("FP8 amax all-reduce (MAX)", "all_reduce", 4.0 * num_amax, 1, "none"))
    return out
