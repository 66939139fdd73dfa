"""python -m train.sensitivity: bad input, the plan, and a planted per-layer effect found end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from train.sensitivity import anchored, main, preset

FAST = ["trainer.max_steps=40", "trainer.eval_every=40", "trainer.log_every=1", "logger=none",
        "trainer.checkpoint_every=0"]  # fmt: skip


def tool(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.sensitivity", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["+recipe=bf16"], "lowbit: config error: recipe.quantizer=none: the search needs a quantized recipe"),
        (["+recipe=mxfp4_e2m1", "stats.every=5"], "lowbit: config error: stats.every=5: train.sensitivity sets it"),
        (["+recipe=mxfp4_e2m1", "reference.mode=lockstep"], "lowbit: config error: reference.mode=lockstep"),
        (["--seeds", "1", "+recipe=mxfp4_e2m1"], "lowbit: config error: --seeds=1: at least 2"),
        (["--budget", "3", "+recipe=mxfp4_e2m1"], "lowbit: config error: --budget=3: at least 4"),
        (["--budget", "7", "--verify", "+recipe=mxfp4_e2m1"], "lowbit: config error: --budget=7: at least 8"),
        (["--target-gap", "0", "+recipe=mxfp4_e2m1"], "lowbit: config error: --target-gap=0.0: must be > 0"),
        (["+recipe=mxfp4_e2m1", "recipe.skip_modules=[blocks,lm_head]"],
         "lowbit: config error: recipe.skip_modules=['blocks', 'lm_head']: the recipe converts no Linear"),
        (["+recipe=mxfp4_e2m1", "recipe.block_size=7"], "lowbit: config error: recipe.block_size=7"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line(args, line, capsys):
    with pytest.raises(SystemExit) as e:  # in-process: main() exits before any run starts
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(line) and err.count("\n") == 1, err[-2000:]


def test_plan_counts_runs_within_the_budget(tmp_path):
    proc = tool("--plan", "--budget", "9", "--out", str(tmp_path), "+recipe=mxfp4_e2m1", *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # 8 converted layers: bisection needs up to 3 candidates; the budget leaves (9 - 4) // 2 = 2
    assert "8 converted layers" in proc.stdout and "up to 2 bisection candidates x 2" in proc.stdout, (
        proc.stdout
    )
    assert "at most 8 runs, budget 9" in proc.stdout and not any(tmp_path.iterdir())


def test_preset_is_the_composed_recipe_plus_anchored_layers():
    from recipes.config import RecipeConfig

    over = {"weight_format": "fp4_e2m1"}
    rec = RecipeConfig(name="mx", quantizer="mx", input_format="fp4_e2m1", block_size=32,
                       layer_formats={r"^blocks\.1\.mlp\.fc$": over, "attn": over})  # fmt: skip
    converted = ["blocks.1.attn.qkv", "blocks.1.mlp.fc", "blocks.11.mlp.fc"]
    text = preset(rec, "mx_sens", ["blocks.1.mlp.fc"], "# header\n", converted)
    doc = yaml.safe_load(text)
    assert text.startswith("# header\ndefaults: [_schema, _self_]\n")
    # the key that only matched the now-kept layer is dropped; the other stays
    assert doc == {"defaults": ["_schema", "_self_"], "name": "mx_sens", "quantizer": "mx",
                   "input_format": "fp4_e2m1", "block_size": 32,
                   "skip_modules": ["lm_head", r"^blocks\.1\.mlp\.fc$"], "layer_formats": {"attn": over}}  # fmt: skip
    assert anchored("blocks.1.mlp.fc") == r"^blocks\.1\.mlp\.fc$"


# every layer's weight in MXINT8 (a mild, low-noise base), two layers entirely in MXFP4: the planted effect
PLANTED = """defaults: [_schema, _self_]
name: planted
quantizer: mx
weight_format: int8
block_size: 32
layer_formats:
  '^blocks\\.0\\.mlp\\.fc$': {input_format: fp4_e2m1, weight_format: fp4_e2m1, grad_output_format: fp4_e2m1}
  '^blocks\\.1\\.attn\\.qkv$': {input_format: fp4_e2m1, weight_format: fp4_e2m1, grad_output_format: fp4_e2m1}
"""


@pytest.mark.slow
def test_planted_layers_are_found_and_the_preset_verified(tmp_path):
    (tmp_path / "conf" / "recipe").mkdir(parents=True)
    (tmp_path / "conf" / "recipe" / "planted.yaml").write_text(PLANTED)
    out = tmp_path / "sens"
    args = ["--target-gap", "0.001", "--stats-every", "10", "--out", str(out),
            f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "+recipe=planted", *FAST]  # fmt: skip
    proc = tool("--budget", "10", *args, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "sensitivity.json").read_text())
    planted = {"blocks.0.mlp.fc", "blocks.1.attn.qkv"}
    assert set(res["ranked"][:2]) == planted, res["signals"]
    assert res["status"] == "met" and set(res["keep"]) == planted and res["runs"] <= 10, res
    assert not res["candidates"]["0"]["meets"] and res["candidates"]["0"]["verdict"].startswith("worse")
    # the answer preset: anchored patterns, the planted overrides gone with their layers
    doc = yaml.safe_load(Path(res["preset"]).read_text())
    assert set(doc["skip_modules"]) == {"lm_head", r"^blocks\.0\.mlp\.fc$", r"^blocks\.1\.attn\.qkv$"}
    assert "layer_formats" not in doc and "+recipe=planted_sensitivity" in res["command"]
    assert "Keep 2 layers in BF16" in (out / "sensitivity.md").read_text()
    # the sweep report on the tool's directory compares its members and shows its answer
    rep = subprocess.run([sys.executable, "-m", "train.report", str(out), "--no-plots"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert rep.returncode == 0, rep.stderr[-2000:]
    page = (out / "report" / "index.html").read_text()
    assert (
        "<h2 id='sensitivity'>Which layers must stay in BF16?" in page
        and "<b>Keep 2 layers in BF16</b>" in page
    )
    # the same command with --verify reads every search run back and trains only the fresh seeds
    again = tool("--budget", "14", "--verify", *args, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("train.sensitivity: [") == 2, again.stdout[-3000:]  # verify: bf16, the answer
    res = json.loads((out / "sensitivity.json").read_text())
    assert res["verify"]["seeds"] == [3, 4] and res["verify"]["meets"], res["verify"]


def test_tool_markdown_renders_as_report_html(tmp_path):
    from train.review.ablations import markdown_html, sections

    md = "# title\n\n**Keep 1 layer** (`a.fc`): gap.\n\n| k | gap |\n|---|---|\n| keep 0 | +0.1 <x> |\n\n    python x\n"
    got = markdown_html(md)
    assert got == ("<p><b>Keep 1 layer</b> (<code>a.fc</code>): gap.</p>\n<table><tr><th>k</th><th>gap</th></tr>"
                   "<tr><td>keep 0</td><td>+0.1 &lt;x&gt;</td></tr></table>\n<pre>python x</pre>")  # fmt: skip
    (tmp_path / "attribution.md").write_text(md)
    (tmp_path / "attribution.png").write_bytes(b"png")
    out = tmp_path / "report"
    out.mkdir()
    [(sid, question, body)] = sections([tmp_path], out)
    assert sid == "attribution" and question.startswith("Which GEMM") and (out / "attribution.png").exists()
    assert body.startswith("<img src='attribution.png'") and sections([out], out) == []


def test_members_do_not_inherit_a_distributed_topology():
    """A RANK/WORLD_SIZE/MASTER_PORT in the tool's environment (a caller's in-process engine, a torchrun
    shell) would make every member join it; CI found one holding its port (EADDRINUSE)."""
    from train.ablation import member_env

    env = member_env({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "49821", "MASTER_ADDR": "127.0.0.1",
                      "LOCAL_RANK": "0", "PATH": "/bin", "SLURM_JOB_ID": "7"})  # fmt: skip
    assert env == {"PATH": "/bin", "SLURM_JOB_ID": "7"}
