"""A wgrad GEMM whose reduction dim (tokens per micro-batch) is not a whole number of scale
blocks is zero-padded; the conversion report, ``run_config.yaml`` and the run's log say so."""

from __future__ import annotations

import yaml

from recipes.base import get_recipe

from .conftest import run_lowbit
from .test_recipes_quantized import preset, tiny


def _converted(name: str, **over):
    rec = get_recipe(preset(name, **over))
    rec.resolve("cpu")
    report = rec.convert(tiny())
    return rec, report


def test_blocked_wgrad_pads_tokens_to_whole_blocks():
    rec, report = _converted("mxfp8_e4m3")
    pads = rec.padded_gemms(100)
    assert sorted(pads) == sorted(f"{n}.wgrad" for n in report.converted) and report.converted
    assert set(pads.values()) == {"tokens 100 -> 128 (block 32)"}
    assert rec.padded_gemms(2048) == {}  # 64 whole blocks
    report.padded = pads
    assert "8 GEMMs zero-padded: tokens 100 -> 128 (block 32)" in report.summary()


def test_no_padding_without_blocks_along_tokens():
    assert _converted("fp8_current")[0].padded_gemms(100) == {}  # one scale per tensor
    assert _converted("fp8_rowwise")[0].padded_gemms(100) == {}  # a scale per row: no blocks
    rec, _ = _converted("mxfp8_e4m3", grad_output_format=None, input_format=None, weight_format="fp8_e4m3")
    assert rec.padded_gemms(100) == {}  # the wgrad GEMM quantizes nothing
    assert get_recipe(preset("bf16")).padded_gemms(100) == {}


def test_a_run_names_its_padded_gemms(tmp_path):
    res = run_lowbit(["+recipe=mxfp8_e4m3", "model.seq_len=100", "trainer.micro_batch_size=2",
                      "trainer.global_batch_size=2", "trainer.max_steps=1", "trainer.eval_every=1", "trainer.eval_sequences=2",
                      "stats.every=0", "logger=none", "trainer.checkpoint_every=0"], run_dir=tmp_path / "run")  # fmt: skip
    assert "GEMMs zero-padded: tokens 200 -> 224 (block 32)" in res.proc.stdout + res.proc.stderr
    resolved = yaml.safe_load((tmp_path / "run" / "run_config.yaml").read_text())["resolved"]["recipe"]
    assert resolved["padded_gemms"]["blocks.0.mlp.fc.wgrad"] == "tokens 200 -> 224 (block 32)"
