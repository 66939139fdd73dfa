"""Statistics selection (``train.telemetry.selection``): families, layers, step window, key budget,
and the Transformer Engine debug YAML (nvdlfw-inspect format) mapped onto them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from recipes.errors import ConfigError
from train.config import StatsConfig
from train.telemetry.selection import FAMILIES, keys_per_layer, pick_layers, resolve

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [f"blocks.{i}.{m}" for i in range(12) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]

#: an nvdlfw-inspect config as the TE debug docs write it: two sections, three statistics features
TE_YAML = """
activations_and_grads:
  enabled: true
  layers:
    layer_name_regex_pattern: .*mlp\\.fc
  transformer_engine:
    LogTensorStats:
      enabled: true
      tensors: [activation, gradient]
      stats: [max, min, std]
      freq: 10
      start_step: 20
      end_step: 80
fp8_stats:
  enabled: true
  layers:
    layer_types: [qkv]
  transformer_engine:
    LogFp8TensorStats:
      enabled: true
      tensors_struct:
        - tensor: gradient
          stats: [underflows%, mxfp8_scale_inv_min, mse]
      freq: 5
      start_step: 30
      end_step: 60
disabled_section:
  enabled: false
  transformer_engine:
    DisableFP8GEMM: {enabled: true}
"""


def test_plan_window_and_families():
    plan = resolve(StatsConfig(every=5, start_step=10, end_step=20, families=["gemm", "scales"]))
    assert [s for s in range(1, 31) if plan.is_stat(s)] == [10, 15, 20]
    assert plan.families == ("gemm", "scales")
    assert not resolve(StatsConfig(every=0)).is_stat(10)
    assert set(resolve(StatsConfig()).families) == set(FAMILIES)


def test_inspect_yaml_maps_to_families_layers_and_cadence(tmp_path):
    path = tmp_path / "debug.yaml"
    path.write_text(TE_YAML)
    plan = resolve(StatsConfig(every=100, inspect_config=str(path)))
    # activation -> act, gradient -> grad; underflows% -> grad, scale_inv_min -> scales, mse -> gemm
    assert plan.families == ("grad", "act", "gemm", "scales")
    assert plan.layers == (r".*mlp\.fc", "qkv")
    assert (plan.every, plan.start_step, plan.end_step) == (5, 20, 80)  # smallest freq, widest window
    assert plan.source == f"stats.inspect_config={path}"
    chosen, why = pick_layers(plan, LAYERS, shadow_formats=0)
    assert why is None and chosen == [n for n in LAYERS if n.endswith(("mlp.fc", "attn.qkv"))]


@pytest.mark.parametrize(
    "text, fix",
    [
        ("s:\n  enabled: true\n  transformer_engine:\n    FakeQuant: {enabled: true}\n", "changes numerics"),
        (
            "s:\n  enabled: true\n  transformer_engine:\n    LogTensorStats: {tensors: [bogus]}\n",
            "use some of",
        ),
        ("s:\n  enabled: false\n", "no enabled statistics feature"),
        ("- a list\n", "expected a mapping"),
    ],
)
def test_inspect_yaml_refusals(tmp_path, text, fix):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        resolve(StatsConfig(inspect_config=str(path)))
    assert info.value.key == "stats.inspect_config" and fix in info.value.fix


def test_key_budget_keeps_evenly_spaced_layers_and_says_so():
    plan = resolve(StatsConfig(families=["gemm", "update"], max_keys=13 * 5))
    assert keys_per_layer(plan, shadow_formats=0) == FAMILIES["gemm"] + FAMILIES["update"] == 13
    chosen, why = pick_layers(plan, LAYERS, shadow_formats=0)
    assert len(chosen) == 5 and chosen[0] == LAYERS[0] and chosen[-1] == LAYERS[-1]
    assert why is not None and "48 layers" in why and "stats.max_keys=65" in why
    regex = resolve(StatsConfig(layers=[r"^blocks\.3\."], max_keys=0))
    assert pick_layers(regex, LAYERS, shadow_formats=0) == (
        [n for n in LAYERS if n.startswith("blocks.3.")],
        None,
    )


def test_bad_family_exits_2_with_one_line():
    proc = subprocess.run(
        [sys.executable, "train/run.py", "stats.families=[gemm,nope]"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() + proc.stdout.splitlines() if "lowbit:" in line]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert lines == ["lowbit: config error: stats.families=nope: use some of: " + ", ".join(FAMILIES)]
