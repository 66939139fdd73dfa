"""Throughput metrics (``perf/``): tokens/s, step time, achieved TFLOP/s, MFU, memory, data time.

FLOPs per token come from ``train/flops.py`` (6N + 12·L·T·D, PaLM appendix B).
MFU names its denominator: ``perf/mfu_bf16_peak`` against the device's dense
BF16 peak, ``perf/mfu_format_peak`` against the dense peak of the recipe's
GEMM format (FP8 for FP8/MXFP8 recipes, FP4 for NVFP4/MXFP4, ...). Devices
without a peak in the table (CPUs) have no MFU unless ``stats.peak_tflops``
configures one; ``run_config.yaml`` says which denominators were used.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Any

import torch

from train.flops import achieved_tflops, device_peak_for_format, flops_per_token, mfu, peak_tflops


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
