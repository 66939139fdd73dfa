"""``python -m train.perfmodel --calibrate``: measure the machine at hand into a hardware YAML.

Short microbenchmarks, each the median of timed repeats after a warm-up, nothing fitted:

* matmul throughput per dtype: an ``n x n`` by ``n x n`` ``torch.matmul`` in FP32 and BF16
  (``2 n^3`` FLOPs per call), and on CUDA the FP8 scaled matmul (``torch._scaled_mm``, E4M3,
  per-tensor scales) where the build and the device have it;
* memory bandwidth: ``dst.copy_(src)`` of a large FP32 buffer (bytes read + written);
* per-op dispatch latency: ``torch.add`` of two one-element tensors.

The measured rates are what this machine achieves, so the YAML sets ``gemm_efficiency`` and
``mem_efficiency`` to 1 and ``kernel_launch_us`` to the dispatch latency. It describes one
rank per node (``gpus_per_node: 1``: ranks on one CPU share its FLOPs and bandwidth); the link
bandwidths are not measured and are set to the memory bandwidth, as the comments say. It is
written under ``outputs/hardware/`` (never ``conf/``) and read back with ``--hardware-file``.
An emulated recipe's step is costed at these rates from its ops, counted in a dispatch trace
(``train.perfmodel.optrace``, ``--trace``); ``python -m bench.perfmodel_cpu`` prints that
prediction next to the measured step.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from train.hwspec import HardwareConfig, validate_hardware


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], *, device: str, repeats: int, warmup: int = 2) -> float:
    """Median seconds of one ``fn()`` call over ``repeats`` timed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_tflops(dtype: torch.dtype, *, n: int, device: str, repeats: int) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / median_time(lambda: torch.matmul(a, b), device=device, repeats=repeats) / 1e12


def fp8_scaled_tflops(*, n: int, device: str, repeats: int) -> float | None:
    """E4M3 ``torch._scaled_mm`` throughput, or None where this build / device has none."""
    if device != "cuda" or not hasattr(torch, "_scaled_mm"):
        return None
    try:
        a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=device)
        mm = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
        return 2 * n**3 / median_time(mm, device=device, repeats=repeats) / 1e12
    except (RuntimeError, TypeError):
        return None


def memory_tb_s(*, numel: int, device: str, repeats: int) -> float:
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    return 2 * 4 * numel / median_time(lambda: dst.copy_(src), device=device, repeats=repeats) / 1e12


def dispatch_us(*, device: str, repeats: int) -> float:
    x = torch.ones(1, device=device)
    return median_time(lambda: torch.add(x, x), device=device, repeats=repeats) * 1e6


def memory_gb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory / 1e9
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def calibrate(name: str, *, device: str, quick: bool = False) -> tuple[HardwareConfig, dict[str, str]]:
    """Measure this machine; return the spec and a source note per field."""
    n, numel, reps = (
        (256, 2**20, 3) if quick else ((4096, 2**28, 10) if device == "cuda" else (1024, 2**25, 5))
    )
    peaks = {"fp32": matmul_tflops(torch.float32, n=n, device=device, repeats=reps),
             "bf16": matmul_tflops(torch.bfloat16, n=n, device=device, repeats=reps)}  # fmt: skip
    fp8 = fp8_scaled_tflops(n=n, device=device, repeats=reps)
    if fp8 is not None:
        peaks["fp8"] = fp8
    bw = memory_tb_s(numel=numel, device=device, repeats=reps)
    lat = dispatch_us(device=device, repeats=max(reps, 50))
    what = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    hw = HardwareConfig(name=name, description=f"calibrated: {what}, {os.cpu_count()} CPUs, torch {torch.__version__}",
                        device_regex="", peak_tflops=peaks, hbm_gb=memory_gb(device), hbm_tb_s=bw, gpus_per_node=1,
                        nvlink_domain=1, intra_node_gb_s=bw * 1e3, inter_node_gb_s=bw * 1e3, gemm_efficiency=1.0,
                        mem_efficiency=1.0, kernel_launch_us=lat)  # fmt: skip
    notes = {
        "peak_tflops": f"median of {reps} torch.matmul calls, {n}x{n} by {n}x{n}"
        + ("; fp8: torch._scaled_mm E4M3" if fp8 is not None else "; no FP8 scaled matmul on this device"),
        "hbm_gb": "device memory" if device == "cuda" else "physical RAM (sysconf)",
        "hbm_tb_s": f"median of {reps} copies of {numel * 4 / 1e6:.0f} MB FP32 (read + write bytes)",
        "gpus_per_node": "one rank: the measured rates are the whole device's",
        "intra_node_gb_s": "not measured: set to the memory bandwidth",
        "inter_node_gb_s": "not measured: set to the memory bandwidth (measure the network to model nodes)",
        "gemm_efficiency": "1: the peaks above are measured, already achievable",
        "mem_efficiency": "1: the bandwidth above is measured",
        "kernel_launch_us": "median dispatch of torch.add on one-element tensors",
    }
    return validate_hardware(hw), notes


def write_yaml(hw: HardwareConfig, notes: dict[str, str], path: Path) -> Path:
    """The spec as a ``conf/hardware``-style YAML, a source comment on every measured line."""
    lines = [f"# {hw.description}", f"# measured by python -m train.perfmodel --calibrate, {time.strftime('%Y-%m-%d %H:%M')}",
             f"name: {hw.name}", f"description: {hw.description!r}", "device_regex: ''", "match_order: 100",
             f"peak_tflops:                 # {notes['peak_tflops']}"]  # fmt: skip
    lines += [f"  {k}: {v:.6g}" for k, v in hw.peak_tflops.items()]
    for key in ("hbm_gb", "hbm_tb_s", "gpus_per_node", "nvlink_domain", "intra_node_gb_s", "inter_node_gb_s",
                "gemm_efficiency", "mem_efficiency", "kernel_launch_us"):  # fmt: skip
        value = getattr(hw, key)
        text = f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}"
        lines.append(f"{text:<29}# {notes.get(key, 'one rank')}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
