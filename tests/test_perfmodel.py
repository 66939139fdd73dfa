"""train.perfmodel and conf/hardware/: hand-computed cases, monotonic sanity, every spec loads,
bad input exits 2 with one line, the FLOPs agree with flops_per_token, and the per-GEMM
rooflines equal torchao's ``roofline_utils`` for the same shapes and assumptions."""

from __future__ import annotations

import dataclasses
import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recipes.base import get_recipe
from recipes.config import RecipeConfig
from recipes.errors import ConfigError
from train.cli import compose
from train.config import ModelConfig
from train.hwspec import HARDWARE_DIR, HardwareConfig, hardware_names, load_hardware, rate_family
from train.perfmodel import roofline as rl
from train.perfmodel.__main__ import compose_perfmodel, hardware_file, main
from train.perfmodel.predict import predict_step
from train.perfmodel.step import linear_gemms
from train.telemetry.perf import flops_per_token, gemm_params

ROOT = Path(__file__).resolve().parents[1]
HEADLINE = ("h100", "h200", "b200", "gb200", "mi300x", "mi355x")


def toy_hw(**kw) -> HardwareConfig:
    base = dict(name="toy", peak_tflops={"bf16": 1000.0, "fp8": 2000.0}, hbm_gb=80, hbm_tb_s=1.0,
                gpus_per_node=8, intra_node_gb_s=100.0, inter_node_gb_s=25.0, gemm_efficiency=0.5,
                mem_efficiency=0.5, kernel_launch_us=0.0)  # fmt: skip
    return HardwareConfig(**{**base, **kw})


@functools.cache
def composed(overrides: tuple[str, ...]):
    return compose(list(overrides))


def predict(
    overrides: list[str], hw: HardwareConfig, *, nodes: int = 1, recipe_cfg: RecipeConfig | None = None
):
    cfg = composed(tuple(overrides))  # read only: predict_step never mutates the config
    return predict_step(cfg, hw, get_recipe(recipe_cfg or cfg.recipe), nodes=nodes)


# ---------------------------------------------------------------- hand-computed cases
def test_one_gemm_roofline_by_hand():
    hw = toy_hw()
    m = k = n = 4096
    moved = rl.gemm_bytes(m, k, n, a_bits=16, b_bits=16)
    assert moved == 3 * 4096 * 4096 * 2
    r = rl.gemm(m, k, n, peak_tflops=1000.0, bytes_moved=moved, hw=hw)
    # 2 * 4096^3 FLOPs at 1000 TFLOP/s x 0.5 = 274.9 us; 100.7 MB at 1 TB/s x 0.5 = 201.3 us
    assert r.flops == 2 * 4096**3
    assert r.time_s == pytest.approx(2 * 4096**3 / 0.5e15) and r.bound == "compute"
    assert r.intensity == pytest.approx(2 * 4096**3 / (6 * 4096**2))  # 1365.3 FLOP/B
    thin = rl.gemm(
        16, k, n, peak_tflops=1000.0, bytes_moved=rl.gemm_bytes(16, k, n, a_bits=16, b_bits=16), hw=hw
    )
    assert thin.bound == "memory" and thin.time_s == pytest.approx(thin.bytes / 0.5e12)
    floored = rl.gemm(1, 1, 1, peak_tflops=1000.0, bytes_moved=6, hw=toy_hw(kernel_launch_us=2.0))
    assert floored.bound == "latency" and floored.time_s == 2e-6


def test_one_ring_all_reduce_by_hand():
    hw = toy_hw()
    # 1 GB over 8 GPUs of one node: 2 * 7/8 * 1 GB / 100 GB/s = 17.5 ms
    assert rl.ring("all_reduce", 1e9, num_gpus=8, hw=hw).time_s == pytest.approx(0.0175)
    # 16 GPUs leave the 8-GPU NVLink domain: the 25 GB/s NIC decides, 2 * 15/16 * 1 GB / 25 GB/s
    assert rl.ring("all_reduce", 1e9, num_gpus=16, hw=hw).time_s == pytest.approx(0.075)
    assert rl.ring("reduce_scatter", 1e9, num_gpus=8, hw=hw).time_s == pytest.approx(0.00875)
    assert rl.ring("all_gather", 1e9, num_gpus=1, hw=hw).time_s == 0.0
    # GB200: 72 GPUs in 18 four-GPU trays are one NVLink domain
    gb200 = load_hardware("gb200")
    assert rl.link_gb_s(gb200, num_gpus=72) == 900 and rl.link_gb_s(gb200, num_gpus=76) == 50


def test_zero_memory_matches_the_zero_paper_figure_1():
    """Rajbhandari et al. 2020, fig. 1: 7.5 B parameters, N_d = 64, K = 12."""
    psi = 7.5e9
    gb = {s: sum(rl.zero_memory(int(psi), stage=s, dp=64).values()) / 1e9 for s in range(4)}
    assert gb[0] == pytest.approx(120.0)
    assert gb[1] == pytest.approx(31.4, abs=0.05)
    assert gb[2] == pytest.approx(16.6, abs=0.05)
    assert gb[3] == pytest.approx(1.9, abs=0.05)
    assert rl.zero_memory(10**9, stage=2, dp=8) == {"params": 2e9, "grads": 2.5e8, "optimizer": 1.5e9}


def test_activation_memory_korthikanti():
    s, b, h = 2048, 4, 2048
    # the paper's 34 s b h less its two s b h dropout masks, GELU F = 4h, no score matrix
    assert rl.layer_activation_bytes(seq=s, batch=b, d_model=h, fc_out=4 * h, ffn=4 * h) == 32 * s * b * h
    kw = dict(layers=24, seq=s, batch=b, d_model=h, fc_out=4 * h, ffn=4 * h)
    assert rl.activation_memory(**kw, checkpointing=False) == 24 * 32 * s * b * h
    assert rl.activation_memory(**kw, checkpointing=True) == 24 * 2 * s * b * h + 32 * s * b * h


# ---------------------------------------------------------------- FLOPs: one source
@pytest.mark.parametrize("model,recipe", [("20m", "fp8_delayed"), ("20m", "nvfp4"), ("tiny", "bf16")])
def test_gemm_flops_agree_with_flops_per_token(model, recipe):
    pred = predict([f"model={model}", f"+recipe={recipe}"], load_hardware("b200"))
    cfg = compose([f"model={model}"])
    mc = cfg.model.resolve(256)
    s = pred["summary"]
    assert s["linear_gemm_flops_match"]
    assert s["gemm_flops_per_token"] == 6 * gemm_params(mc, vocab_size=256)
    causal = flops_per_token(mc, vocab_size=256, seq_len=mc.seq_len, causal_attention=True)
    assert s["gemm_flops_per_token"] + s["attention_flops_per_token"] == pytest.approx(causal)
    assert s["flops_per_token"] == flops_per_token(
        mc, vocab_size=256, seq_len=mc.seq_len
    )  # MFU: PaLM's count


# ---------------------------------------------------------------- monotonic sanity
@pytest.mark.parametrize("field", ["hbm_tb_s", "intra_node_gb_s", "inter_node_gb_s"])
def test_more_bandwidth_is_never_slower(field):
    hw = load_hardware("h100")
    args = [
        "model=20m",
        "+recipe=mxfp8",
        "parallel=zero3",
        "launcher.nproc_per_node=8",
        "trainer.micro_batch_size=4",
    ]
    times = [predict(args, dataclasses.replace(hw, **{field: getattr(hw, field) * f}), nodes=2)["summary"]["step_time_s"]
             for f in (0.5, 1.0, 4.0)]  # fmt: skip
    assert times == sorted(times, reverse=True), times


def test_more_peak_is_never_slower():
    hw = load_hardware("b200")
    times = []
    for f in (0.5, 1.0, 2.0):
        peaks = {k: v * f for k, v in hw.peak_tflops.items()}
        times.append(predict(["model=20m", "+recipe=nvfp4"], dataclasses.replace(hw, peak_tflops=peaks))["summary"]["step_time_s"])  # fmt: skip
    assert times == sorted(times, reverse=True), times


def test_a_bigger_model_never_has_fewer_flops():
    sizes = ["tiny", "20m", "125m", "350m", "760m", "1.3b", "2.7b", "6.7b", "13b"]
    flops = []
    for name in sizes:
        mc = ModelConfig(
            **yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())["model"]
        ).resolve(256)
        flops.append(flops_per_token(mc, vocab_size=256, seq_len=mc.seq_len, causal_attention=True))
    assert flops == sorted(flops), dict(zip(sizes, flops))


# ---------------------------------------------------------------- the hardware table
@pytest.mark.parametrize("name", hardware_names())
def test_every_hardware_yaml_loads_validates_and_cites(name):
    spec = load_hardware(name)
    assert spec.name == name and spec.peak_tflops["bf16"] > 0
    assert compose_perfmodel([f"hardware={name}"]).hardware == spec  # Hydra and the trainer read one table
    text = (HARDWARE_DIR / f"{name}.yaml").read_text()
    assert re.search(r"datasheet|data sheet|whitepaper|product page|torchao", text.split("\nname:")[0], re.I)
    for line in text.splitlines():  # every top-level number says where it comes from
        if re.match(r"^[a-z_]+: [0-9.]+", line) and not line.startswith("match_order"):
            assert "#" in line, f"{name}.yaml: {line!r} has no source comment"


def test_headline_chips_are_present():
    assert set(HEADLINE) <= set(hardware_names())
    assert load_hardware("gb200").gpus_per_node == 4 and load_hardware("gb200").domain == 72


def test_missing_format_is_emulated_in_the_next_best_one():
    h100, a100, mi355x, b200 = (load_hardware(n) for n in ("h100", "a100", "mi355x", "b200"))
    assert rate_family(h100, "fp4") == "fp8" and rate_family(h100, "fp6") == "fp8"
    assert rate_family(a100, "fp8") == "bf16" and rate_family(a100, "fp4") == "bf16"
    assert rate_family(mi355x, "fp6") == "fp6" and rate_family(b200, "fp4") == "fp4"
    assert rate_family(h100, "fp32") is None
    s = predict(["model=20m", "+recipe=nvfp4"], h100)
    gemms = [c for c in s["components"] if c["kind"] == "gemm" and c["family"] == "fp4"]
    assert gemms and all(c["emulated_as"] == "fp8" for c in gemms)
    assert s["summary"]["format_emulated_as"] == "fp8"
    with pytest.raises(ConfigError, match="fp32"):
        predict(["model=20m", "+recipe=fp32"], h100)


def test_a_hypothetical_chip_is_an_override():
    pm = compose_perfmodel(["hardware=h100", "+hardware.peak_tflops.fp4=4000", "nodes=2"])
    assert pm.nodes == 2 and pm.hardware.peak_tflops["fp4"] == 4000
    real = predict(["model=125m", "+recipe=nvfp4"], load_hardware("h100"))["summary"]
    what_if = predict(["model=125m", "+recipe=nvfp4"], pm.hardware)["summary"]
    assert what_if["format_emulated_as"] is None and what_if["step_time_s"] < real["step_time_s"]


def test_training_config_does_not_know_hardware():
    """The hardware group composes only for the perfmodel: a training run refuses it, not ignores it."""
    with pytest.raises(ConfigError):
        compose(["hardware=h100"])


# ---------------------------------------------------------------- bad input
def test_unknown_hardware_is_a_one_line_error_in_a_subprocess():
    res = subprocess.run([sys.executable, "-m", "train.perfmodel", "hardware=h900"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lowbit: config error: hardware=h900: unknown hardware")


@pytest.mark.parametrize("arg,key", [("hardware.intra_node_gb_s=-5", "hardware.intra_node_gb_s"),
                                     ("hardware.mem_efficiency=1.5", "hardware.mem_efficiency"),
                                     ("nodes=0", "nodes"), ("launcher.nproc_per_node=9", "launcher.nproc_per_node")])  # fmt: skip
def test_bad_values_exit_2(arg, key, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["model=tiny", arg])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lowbit: config error: {key}="), err


def test_cli_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "pred.json"
    assert (
        main(["--out", str(out), "model=20m", "+recipe=mxfp8", "hardware=b200", "launcher.nproc_per_node=4"])
        == 0
    )
    text = capsys.readouterr().out
    assert "speedup over bf16" in text and "top bottleneck" in text and "memory per GPU" in text
    import json

    data = json.loads(out.read_text())
    s = data["prediction"]["summary"]
    assert s["speedup_over_bf16"] == pytest.approx(data["bf16"]["summary"]["step_time_s"] / s["step_time_s"])
    assert {c["bound"] for c in data["prediction"]["components"]} <= {
        "compute",
        "memory",
        "network",
        "latency",
        "mixed",
    }


# ---------------------------------------------------------------- torchao's roofline_utils
SHAPES = [(16384, 2048, 8192), (8192, 8192, 2048), (256, 4096, 4096), (64, 512, 1024)]


@pytest.mark.parametrize("recipe,dtype_name,mx_name", [("bf16", "bfloat16", None),
                                                       ("fp8_current", "float8_e4m3fn", None),
                                                       ("mxfp8", "float8_e4m3fn", "mxfp8_cublas")])  # fmt: skip
def test_per_gemm_times_equal_torchao_roofline_utils(recipe, dtype_name, mx_name, monkeypatch):
    import torch
    from torchao.testing.training import roofline_utils as ru

    hw = load_hardware("h100")
    monkeypatch.setitem(ru.gpu_name_to_specs, "lowbit h100", {
        "bf16_peak_tops": hw.peak_tflops["bf16"] * 1e12, "fp8_peak_tops": hw.peak_tflops["fp8"] * 1e12,
        "peak_mem_bw_bytes_sec": hw.hbm_tb_s * 1e12, "pct_achievable_gemm_tops": hw.gemm_efficiency,
        "pct_achievable_mem_bw": hw.mem_efficiency})  # fmt: skip
    assert ru.KERNEL_LAUNCH_OVERHEAD_SEC == hw.kernel_launch_us * 1e-6
    cfg = dataclasses.replace(
        compose([f"+recipe={recipe}"]).recipe, fp8_format="E4M3"
    )  # torchao: e4m3 for dY too
    rec = get_recipe(cfg)
    dtype = getattr(torch, dtype_name)
    for m, k, n in SHAPES:
        ours = {c["name"].split()[-1]: c["time_s"] for c in
                map(lambda c: c.to_json(), linear_gemms("l", n, k, m=m, recipe=rec, converted=True, hw=hw, accum=1))
                if c["kind"] == "gemm"}  # fmt: skip
        theirs = {
            "fwd": ru.get_individual_gemm_time_sympy(m, k, n, dtype, mx_name, "lowbit h100"),
            "dgrad": ru.get_individual_gemm_time_sympy(m, n, k, dtype, mx_name, "lowbit h100"),
            "wgrad": ru.get_individual_gemm_time_sympy(k, m, n, dtype, mx_name, "lowbit h100"),
        }
        for gemm, t in theirs.items():
            # FP8 tensorwise: we also read the two FP32 per-tensor scales (8 bytes); torchao does not
            assert ours[gemm] == pytest.approx(float(t), rel=1e-6), (m, k, n, gemm)


# ---------------------------------------------------------------- --calibrate
def test_calibrate_writes_a_spec_the_model_reads(tmp_path, capsys):
    path = tmp_path / "hardware" / "here.yaml"
    assert main(["--calibrate", "--quick", "--name", "here", "--out", str(path)]) == 0
    spec = hardware_file(path)
    assert spec.name == "here" and spec.device_regex == "" and spec.gemm_efficiency == 1.0
    assert spec.peak_tflops["fp32"] > 0 and spec.peak_tflops["bf16"] > 0 and spec.hbm_tb_s > 0
    assert spec.kernel_launch_us > 0
    text = path.read_text()
    for line in text.splitlines():  # every measured number says how it was measured
        if re.match(r"^[a-z_]+: [0-9.]+", line) and not line.startswith("match_order"):
            assert "#" in line, line
    capsys.readouterr()
    assert main(["--hardware-file", str(path), "model=tiny", "+recipe=fp32"]) == 0
    assert "speedup over bf16" in capsys.readouterr().out
