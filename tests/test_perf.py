"""train.telemetry.perf: FLOP counts against hand arithmetic and the real model, peak lookup, MFU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from recipes.config import GEMM_FAMILIES
from train.config import ModelConfig
from train.model import GPT
from train.telemetry.perf import (
    PEAK_TFLOPS,
    achieved_tflops,
    device_peak_for_format,
    flops_per_token,
    gemm_params,
    mfu,
    peak_tflops,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def preset(name: str) -> ModelConfig:
    return ModelConfig(**yaml.safe_load((CONF / f"{name}.yaml").read_text())["model"])


def linear_weights(cfg: ModelConfig, vocab_size: int) -> int:
    """Weights of every nn.Linear of the real model (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = GPT(cfg, vocab_size=vocab_size)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def test_tiny_model_by_hand():
    cfg = preset("tiny")  # L 2, D 128, T 128, GELU 4x: F 512; bytes: V 256
    # per layer: qkv 3*128^2 + proj 128^2 + fc 128*512 + proj 512*128 = 49152 + 16384 + 65536 + 65536
    n = 2 * (49152 + 16384 + 65536 + 65536) + 128 * 256  # + lm_head
    assert n == 425984 == gemm_params(cfg, vocab_size=256) == linear_weights(cfg, 256)
    attn = 12 * 2 * 128 * 128  # 12 L T D = 393216
    assert flops_per_token(cfg, vocab_size=256, seq_len=128) == 6 * 425984 + 393216 == 2949120
    assert flops_per_token(cfg, vocab_size=256, seq_len=128, causal_attention=True) == 6 * n + attn // 2


def test_gpt3_125m_by_hand_and_palm_formula():
    cfg = preset("125m")  # GPT-3 Small: L 12, D 768, H 12, T 2048, tied embeddings; GPT-2 BPE V 50257
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.seq_len, cfg.tie_embeddings) == (
        12,
        768,
        12,
        2048,
        True,
    )
    # 12 D^2 per layer (4 D^2 attention + 8 D^2 MLP) = 7,077,888; x12 = 84,934,656;
    # lm_head 768 * 50257 = 38,597,376 (counted although tied: it is a GEMM)
    n = 84_934_656 + 38_597_376
    assert n == 123_532_032 == gemm_params(cfg, vocab_size=50257) == linear_weights(cfg, 50257)
    # PaLM appendix B / nanoGPT: 6N + 12 L H Q T, H Q = 12 * 64 = D
    palm = 6 * n + 12 * 12 * 12 * 64 * 2048
    assert palm == 741_192_192 + 226_492_416 == 967_684_608
    assert flops_per_token(cfg, vocab_size=50257, seq_len=2048) == palm
    # a shorter training sequence only changes the attention term
    assert flops_per_token(cfg, vocab_size=50257, seq_len=1024) == 6 * n + 12 * 12 * 1024 * 768


def test_swiglu_counts_the_fused_gate_and_up_projection():
    cfg = ModelConfig(n_layers=3, d_model=192, n_heads=3, seq_len=64, ffn_mult=8 / 3, mlp="swiglu")
    f = 384  # 2/3 * (8/3 * 192) = 341.3 -> rounded up to a multiple of 64
    n = 3 * (4 * 192 * 192 + 192 * 2 * f + f * 192) + 192 * 1000  # = 1,297,920
    assert gemm_params(cfg, vocab_size=1000) == n == linear_weights(cfg, 1000)


def test_achieved_tflops_and_mfu_arithmetic():
    assert achieved_tflops(1e5, 967_684_608) == pytest.approx(96.7684608)
    assert achieved_tflops(0.0, 1e9) == 0.0
    assert mfu(494.7, 989.4) == pytest.approx(0.5)
    assert mfu(100.0, None) is None and mfu(100.0, 0.0) is None


@pytest.mark.parametrize(
    "name, bf16, fp8",
    [
        ("NVIDIA H100 80GB HBM3", 989.4, 1978.9),  # SXM5
        ("NVIDIA H100 PCIe", 756.0, 1513.0),
        ("NVIDIA H200", 989.4, 1978.9),
        ("NVIDIA A100-SXM4-80GB", 312.0, None),
        ("NVIDIA A100 80GB PCIe", 312.0, None),
        ("NVIDIA B200", 2250.0, 4500.0),
        # known since the table moved to conf/hardware/ (GB200 NVL72 datasheet, dense per GPU)
        ("NVIDIA GB200", 2500.0, 5000.0),
        ("AMD Instinct MI300X", 1307.4, 2614.9),
    ],
)
def test_peak_lookup_by_torch_device_names(name: str, bf16: float, fp8: float | None):
    assert peak_tflops(name, "bf16") == bf16
    assert peak_tflops(name, torch.bfloat16) == bf16
    assert peak_tflops(name, "fp8") == fp8


def test_cpu_and_unknown_devices_have_no_peak():
    for name in (
        "cpu",
        "",
        None,
        "AMD EPYC 7763 64-Core Processor",
        "NVIDIA GeForce RTX 4090",
    ):
        assert peak_tflops(name, "bf16") is None
        assert device_peak_for_format(name, "fp8") is None
    assert mfu(1.0, peak_tflops("cpu", "bf16")) is None
    with pytest.raises(ValueError, match="bf16"):
        peak_tflops("NVIDIA H100 PCIe", "tf32")


def test_more_specific_device_patterns_win():
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") != peak_tflops("NVIDIA H100 80GB HBM3", "bf16")
    assert peak_tflops("NVIDIA H100 NVL", "bf16") == 835.5
    assert peak_tflops("NVIDIA GH200 480GB", "bf16") == 989.4  # not matched as "H200"
    patterns = list(dict.fromkeys(p for p, _ in PEAK_TFLOPS))
    assert patterns.index(r"\bH100\b.*\bPCIe\b") < patterns.index(r"\bH100\b")


def test_gemm_family_peaks():
    h100, b200, a100 = "NVIDIA H100 80GB HBM3", "NVIDIA B200", "NVIDIA A100-SXM4-40GB"
    assert device_peak_for_format(h100, "bf16") == 989.4
    assert device_peak_for_format(h100, "fp8") == 1978.9
    assert device_peak_for_format(h100, "fp4") is None  # Hopper has no FP4 tensor cores
    assert device_peak_for_format(h100, "fp6") is None
    assert device_peak_for_format(b200, "fp4") == 9000.0
    assert device_peak_for_format(b200, "fp6") == 4500.0
    assert device_peak_for_format(b200, "int8") == 4500.0
    assert device_peak_for_format(a100, "fp8") is None and device_peak_for_format(a100, "BF16") == 312.0
    assert device_peak_for_format(b200, "fp32") is None
    with pytest.raises(ValueError, match="fp8"):
        device_peak_for_format(h100, "fp3")
    assert set(GEMM_FAMILIES) - {"fp32"} <= {d for _, d in PEAK_TFLOPS}


@pytest.mark.parametrize(
    "preset,family",
    [("bf16", "bf16"), ("fp32", "fp32"), ("mxfp8_e4m3", "fp8"), ("mxfp8", "fp8"), ("mxfp6_e2m3", "fp6"),
     ("mxfp4_e2m1", "fp4"), ("mxint8", "int8"), ("mx_paper_w4a6", "fp6"), ("nvfp4", "fp4"),
     ("fp8_delayed", "fp8"), ("fp8_current", "fp8"), ("fp8_block", "fp8"), ("fp8_rowwise", "fp8")],
)  # fmt: skip
def test_each_preset_names_its_gemm_family(preset, family):
    """The recipe answers (no string decoding in train/): MXFP8 -> the fp8 peak, NVFP4/MXFP4 -> fp4."""
    from recipes.base import get_recipe
    from train.cli import compose

    recipe = get_recipe(compose([f"+recipe={preset}"]).recipe)
    assert recipe.gemm_family() == family
