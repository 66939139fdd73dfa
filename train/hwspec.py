"""Accelerator specs as config: ``conf/hardware/NAME.yaml``, the one table of device peaks.

Each YAML sets the fields of :class:`HardwareConfig` (the source of every number is a comment
in the file). Two readers use it:

* the trainer's MFU (``train.telemetry.perf.peak_tflops``): the first spec, in ``match_order``
  then name order, whose ``device_regex`` matches ``torch.cuda.get_device_name()`` gives the
  dense peak of a GEMM family;
* ``python -m train.perfmodel hardware=NAME``: the whole spec (``PerfRunConfig.hardware``).

A family missing from ``peak_tflops`` is one the chip has no tensor-core rate for (FP4 on
H100). The trainer then logs no format-peak MFU; the performance model predicts the GEMM in
the next-best family the chip has (:func:`rate_family`) and says so.

Units: TFLOP/s (int8: TOPS), dense, no 2:4 sparsity; GB and GB/s decimal; link bandwidths per
GPU and per direction.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from recipes.config import GEMM_FAMILIES
from recipes.errors import ConfigError

HARDWARE_DIR = Path(__file__).resolve().parents[1] / "conf" / "hardware"
#: element bits of each GEMM family: a family can stand in for a narrower one it lacks
FAMILY_BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "int8": 8, "fp8": 8, "fp6": 6, "fp4": 4}


@dataclass
class HardwareConfig:
    """One accelerator (a ``conf/hardware/*.yaml`` preset; a hypothetical chip is one more file)."""

    name: str = "custom"
    description: str = ""
    device_regex: str = ""
    """re.search, case-insensitive, on ``torch.cuda.get_device_name()``; "" matches no device."""
    match_order: int = 100
    """Lookup order (lower first): a variant's pattern (H100 PCIe) before its family's (H100)."""
    peak_tflops: dict[str, float] = field(default_factory=dict)
    """Dense tensor-core peak per GEMM family (``recipes.config.GEMM_FAMILIES``); absent: no rate."""
    hbm_gb: float = 0.0
    hbm_tb_s: float = 0.0
    gpus_per_node: int = 1
    """GPUs one node holds: the most ``launcher.nproc_per_node`` may be."""
    nvlink_domain: int = 0
    """GPUs joined by the intra-node fabric (GB200 NVL72: 72, more than a 4-GPU tray); 0 = a node."""
    intra_node_gb_s: float = 0.0
    """Per GPU, per direction, inside the NVLink domain."""
    inter_node_gb_s: float = 0.0
    """Per GPU, per direction, beyond the NVLink domain (the NIC)."""
    gemm_efficiency: float = 0.78
    """Achievable fraction of the peak GEMM rate (torchao roofline_utils: 0.78)."""
    mem_efficiency: float = 0.92
    """Achievable fraction of the HBM bandwidth (torchao roofline_utils: 0.92)."""
    kernel_launch_us: float = 2.0
    """Floor of any one kernel's time (torchao roofline_utils: 2 us)."""

    @property
    def domain(self) -> int:
        return self.nvlink_domain or self.gpus_per_node


_POSITIVE = ("hbm_gb", "hbm_tb_s", "intra_node_gb_s", "inter_node_gb_s")
_FRACTIONS = ("gemm_efficiency", "mem_efficiency")


def validate_hardware(hw: HardwareConfig) -> HardwareConfig:
    """Raise a ConfigError naming ``hardware.<field>`` and the fix; return ``hw``."""

    def bad(key: str, value: object, fix: str) -> ConfigError:
        return ConfigError(f"hardware.{key}", value, fix)

    for key in _POSITIVE:
        if not getattr(hw, key) > 0:
            raise bad(
                key, getattr(hw, key), "must be > 0 (a datasheet figure; units in conf/hardware/h100.yaml)"
            )
    for key in _FRACTIONS:
        if not 0 < getattr(hw, key) <= 1:
            raise bad(key, getattr(hw, key), "a fraction of the peak, in (0, 1]")
    if hw.gpus_per_node < 1 or hw.nvlink_domain < 0 or hw.kernel_launch_us < 0:
        key = (
            "gpus_per_node"
            if hw.gpus_per_node < 1
            else "nvlink_domain"
            if hw.nvlink_domain < 0
            else "kernel_launch_us"
        )
        raise bad(key, getattr(hw, key), "must be >= 1 (gpus_per_node) or >= 0")  # fmt: skip
    if hw.nvlink_domain and hw.nvlink_domain < hw.gpus_per_node:
        raise bad("nvlink_domain", hw.nvlink_domain, f"at least gpus_per_node ({hw.gpus_per_node}), or 0")
    for fam, peak in hw.peak_tflops.items():
        if fam not in GEMM_FAMILIES:
            raise bad(
                f"peak_tflops.{fam}", peak, f"unknown GEMM family; use one of {', '.join(GEMM_FAMILIES)}"
            )
        if not peak > 0:
            raise bad(f"peak_tflops.{fam}", peak, "must be > 0 (leave a family out if the chip lacks it)")
    if "bf16" not in hw.peak_tflops:
        raise bad("peak_tflops.bf16", None, "every spec needs a BF16 peak (the MFU denominator)")
    try:
        re.compile(hw.device_regex)
    except re.error as e:
        raise bad("device_regex", hw.device_regex, f"not a regex ({e})") from None
    return hw


def from_dict(d: dict) -> HardwareConfig:
    known = {f.name for f in fields(HardwareConfig)}
    extra = sorted(set(d) - known)
    if extra:
        raise ConfigError(
            f"hardware.{extra[0]}", d[extra[0]], f"unknown field; fields: {', '.join(sorted(known))}"
        )
    peaks = {str(k): float(v) for k, v in (d.get("peak_tflops") or {}).items()}
    return validate_hardware(HardwareConfig(**{**d, "peak_tflops": peaks}))


def hardware_names(directory: Path = HARDWARE_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def load_hardware(name: str, directory: Path = HARDWARE_DIR) -> HardwareConfig:
    """``conf/hardware/<name>.yaml`` as a validated spec; an unknown name is a ConfigError."""
    path = directory / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(
            "hardware", name, f"unknown hardware; choose one of: {', '.join(hardware_names(directory))}"
        )
    return from_dict(yaml.safe_load(path.read_text()))


@functools.cache
def device_table() -> tuple[HardwareConfig, ...]:
    """Every shipped spec with a device pattern, in lookup order (``match_order``, then name)."""
    specs = [load_hardware(n) for n in hardware_names()]
    return tuple(sorted((s for s in specs if s.device_regex), key=lambda s: (s.match_order, s.name)))


def match_device(device_name: str | None) -> HardwareConfig | None:
    """The first spec whose pattern matches ``device_name`` (None for CPU / unknown devices)."""
    if not device_name:
        return None
    for spec in device_table():
        if re.search(spec.device_regex, device_name, flags=re.IGNORECASE):
            return spec
    return None


def rate_family(hw: HardwareConfig, family: str) -> str | None:
    """The family a GEMM of ``family`` runs at on ``hw``: itself if the chip has a rate for it,
    else the narrowest floating-point family it has with at least as many bits (FP4 on H100 ->
    fp8, FP8 on A100 -> bf16: the recipe emulated in the next-best format). None when nothing
    fits (fp32 without a ``peak_tflops.fp32``): the caller refuses."""
    if family in hw.peak_tflops:
        return family
    bits = FAMILY_BITS[family]
    wider = [f for f in hw.peak_tflops if FAMILY_BITS[f] >= bits and f != "int8" and f != "fp32"]
    if family == "fp32" or not wider:
        return None
    return min(wider, key=lambda f: (FAMILY_BITS[f], f != "fp8", f != "bf16"))
