"""Throughput metrics (``perf/``): FLOPs per token, tokens/s, step time, TFLOP/s, MFU, memory, data time.

``PerfMeter`` turns a step time into the ``perf/`` keys; the pure functions
below count FLOPs and look up device peaks.

MFU names its denominator: ``perf/mfu_bf16_peak`` against the device's dense
BF16 peak, ``perf/mfu_format_peak`` against the dense peak of the GEMM family
the recipe names (``Recipe.gemm_family()``: fp8 for FP8/MXFP8 recipes, fp4 for
NVFP4/MXFP4, ...). Devices without a peak in the table (CPUs) have no MFU
unless ``stats.peak_tflops`` configures one; ``run_config.yaml`` says which
denominators were used.
Model FLOPs per token, achieved TFLOP/s, and MFU against a table of dense device peaks.

FLOP count (training: forward + backward, per token, no activation recompute)
----------------------------------------------------------------------------
``flops_per_token = 6 * N + 12 * L * T * D`` (``causal_attention=False``, default)

* ``N`` = weights of every GEMM the model runs per token, counted from
  ``train/model.py``: per layer ``qkv`` (3 D^2), ``attn.proj`` (D^2),
  ``mlp.fc`` (D * F, or D * 2F for SwiGLU's fused gate+up) and ``mlp.proj``
  (F * D), times ``L`` layers, plus the **lm_head** (D * V): it is a GEMM on
  every token, so it counts, tied to the embedding or not. Embedding lookups
  (``tok_emb``, ``pos_emb``) are gathers, not GEMMs: not counted. Biases,
  norms, activations, softmax and RoPE are left out (well under 1%).
  A GEMM with W of shape (n, k) costs 2 n k FLOPs per token forward and twice
  that backward (dgrad + wgrad): 6 n k in all.
* Attention scores and mixing: per token and layer the forward does
  ``QK^T`` (2 T D) and ``PV`` (2 T D) against all ``T`` positions; times 3 for
  forward + backward: ``12 L T D``.

This is the formula of the PaLM paper (Chowdhery et al. 2022, appendix B:
``6N + 12 L H Q T`` with ``H Q = D``), which nanoGPT's ``estimate_mfu`` uses,
so MFU numbers compare with published ones. It counts the full T x T score
matrix; a causal kernel (FlashAttention, SDPA ``is_causal``) skips about half
of it: ``causal_attention=True`` counts ``6 L T D`` instead (the work done, not
the PaLM convention). nanoGPT's ``N`` is the parameter count without position
embeddings (its tied ``wte`` standing in for the lm_head, plus norm weights);
ours is the GEMM weights exactly.

Peaks and MFU
-------------
``achieved_tflops = tokens_per_s * flops_per_token / 1e12``; pass tokens/s per
device for a per-device figure. ``mfu = achieved_tflops / peak``, a fraction
(0..1). :data:`PEAK_TFLOPS` holds **dense** (no 2:4 sparsity) tensor-core
peaks per GPU, read from ``conf/hardware/*.yaml`` (``train.hwspec``); ``peak_tflops`` returns None on CPU and unknown devices (MFU is
not defined there: log it as absent, never as 0). The caller names the
denominator in the key: ``perf/mfu_bf16_peak`` (``peak_tflops(dev, "bf16")``)
and ``perf/mfu_format_peak`` (``device_peak_for_format(dev, family)``).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Any

import torch

from recipes.config import GEMM_FAMILIES
from train.config import ModelConfig
from train.hwspec import device_table, match_device

# Dense tensor-core peaks per GPU, TFLOP/s (int8: TOPS), keyed by
# (regex on torch.cuda.get_device_name(), GEMM family), in lookup order: built from
# conf/hardware/*.yaml (``train.hwspec``, the one table; sources are comments there). The FIRST
# device pattern that matches decides (``match_order``: variants first); a family that device
# lacks gives None.
PEAK_TFLOPS: dict[tuple[str, str], float] = {
    (spec.device_regex, family): peak for spec in device_table() for family, peak in spec.peak_tflops.items()
}

_DTYPE_ALIASES = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "fp8": "fp8",
    "fp6": "fp6",
    "fp4": "fp4",
    "int8": "int8",
}
_TORCH_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "int8"}


def gemm_params(model_cfg: ModelConfig, *, vocab_size: int) -> int:
    """``N``: weights of all GEMMs per token (module docstring), lm_head included, embeddings not."""
    d, f = model_cfg.d_model, model_cfg.ffn_dim
    fc_out = 2 * f if model_cfg.mlp == "swiglu" else f
    per_layer = 3 * d * d + d * d + d * fc_out + f * d
    return model_cfg.n_layers * per_layer + d * vocab_size


def flops_per_token(
    model_cfg: ModelConfig, *, vocab_size: int, seq_len: int, causal_attention: bool = False
) -> int:
    """Training FLOPs per token: ``6 N + 12 L T D`` (PaLM / nanoGPT), or ``6 N + 6 L T D`` if causal."""
    n = gemm_params(model_cfg, vocab_size=vocab_size)
    attn = (6 if causal_attention else 12) * model_cfg.n_layers * seq_len * model_cfg.d_model
    return 6 * n + attn


def achieved_tflops(tokens_per_s: float, flops_per_token: float) -> float:
    """``tokens_per_s * flops_per_token / 1e12`` (per device when tokens/s is per device)."""
    return tokens_per_s * flops_per_token / 1e12


def _norm_dtype(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        if dtype not in _TORCH_DTYPES:
            raise ValueError(f"no peak dtype for {dtype}; valid: {sorted(set(_DTYPE_ALIASES.values()))}")
        return _TORCH_DTYPES[dtype]
    key = str(dtype).lower()
    if key not in _DTYPE_ALIASES:
        raise ValueError(f"unknown peak dtype {dtype!r}; valid: {', '.join(_DTYPE_ALIASES)}")
    return _DTYPE_ALIASES[key]


def peak_tflops(device_name: str | None, dtype: str | torch.dtype) -> float | None:
    """Dense peak TFLOP/s of ``device_name`` (as ``torch.cuda.get_device_name()``) in ``dtype``.

    None for CPU, an unknown device, or a dtype the device has no tensor-core
    rate for (A100 fp8): MFU is then undefined.
    """
    key = _norm_dtype(dtype)
    spec = match_device(device_name)
    return None if spec is None else spec.peak_tflops.get(key)


def device_peak_for_format(device_name: str | None, format_family: str) -> float | None:
    """Peak for a recipe's GEMM family (``Recipe.gemm_family()``, one of
    ``recipes.config.GEMM_FAMILIES``): an MXFP8 recipe names ``fp8``, NVFP4 and MXFP4 ``fp4``.

    None where the device has no rate for it (Hopper fp4/fp6, A100 fp8) or for
    fp32 (no FP32 tensor-core peak in the table): the trainer logs no format-peak MFU then
    (``python -m train.perfmodel`` predicts such a GEMM in the next-best family instead,
    ``train.hwspec.rate_family``).
    """
    key = format_family.lower()
    if key not in GEMM_FAMILIES:
        raise ValueError(f"unknown GEMM family {format_family!r}; valid: {', '.join(GEMM_FAMILIES)}")
    return None if key == "fp32" else peak_tflops(device_name, key)


def mfu(tflops: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation ``tflops / peak`` as a fraction; None when the peak is unknown."""
    if peak is None or peak <= 0:
        return None
    return tflops / peak


@dataclass
class PerfMeter:
    flops_per_token: float
    tokens_per_step: int
    world_size: int
    device: str
    peak_bf16: float | None
    peak_format: float | None

    @classmethod
    def build(cls, cfg: Any, *, gemm_family: str, vocab_size: int, world_size: int, device: str) -> PerfMeter:
        name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        peak_bf16 = peak_tflops(name, "bf16")
        peak_fmt = device_peak_for_format(name, gemm_family)
        if cfg.stats.peak_tflops > 0:
            peak_bf16 = peak_fmt = cfg.stats.peak_tflops
        return cls(
            flops_per_token=flops_per_token(cfg.model, vocab_size=vocab_size, seq_len=cfg.model.seq_len),
            tokens_per_step=cfg.trainer.global_batch_size * cfg.model.seq_len,
            world_size=world_size,
            device=device,
            peak_bf16=peak_bf16,
            peak_format=peak_fmt,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "flops_per_token": self.flops_per_token,
            "peak_tflops_bf16_per_device": self.peak_bf16,
            "peak_tflops_format_per_device": self.peak_format,
            "mfu": "defined"
            if self.peak_bf16
            else f"not defined on {self.device}: no dense peak known (set stats.peak_tflops to use one)",
        }

    def metrics(self, *, step_time: float, data_time: float) -> dict[str, float]:
        tok_s = self.tokens_per_step / step_time
        tflops = achieved_tflops(tok_s, self.flops_per_token) / self.world_size  # per device
        out = {
            "perf/step_time_s": step_time,
            "perf/tokens_per_s": tok_s,
            "perf/tokens_per_s_per_device": tok_s / self.world_size,
            "perf/tflops": tflops,
            "perf/data_time_frac": data_time / step_time,
        }
        for key, peak in (("perf/mfu_bf16_peak", self.peak_bf16), ("perf/mfu_format_peak", self.peak_format)):
            value = mfu(tflops, peak)
            if value is not None:
                out[key] = value
        if self.device == "cuda":
            out["perf/max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            out["perf/max_memory_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        else:
            out["perf/max_rss_gib"] = (
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            )  # KiB on Linux
        return out
