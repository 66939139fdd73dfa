"""``python -m train.perfmodel -m``: the sweep expands the cartesian product of its comma lists,
each point is the single prediction, it writes its table (CSV, Markdown, JSON) and plots, the
plots are readable (introspected, as tests/test_report_plots.py does), and a bad sweep value is a
one-line config error that writes nothing."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from matplotlib.figure import Figure

from train.perfmodel import sweep
from train.perfmodel.__main__ import compose_point, main, predict_point
from train.perfmodel.sweep_plots import breakdown_figure, speedup_figure

PNG = b"\x89PNG\r\n\x1a\n"
SWEEP = ["model=tiny,20m", "+recipe=bf16,nvfp4", "hardware=h100,b200"]
TITLE = "test sweep"


@pytest.fixture(scope="module")
def swept():
    keys, points = sweep.expand(SWEEP)
    sweep.run_sweep(points, compose=compose_point, predict=lambda c: predict_point(c, overlap="hidden"))
    return keys, points


def test_expand_is_the_cartesian_product_in_argument_order():
    keys, points = sweep.expand(["model=tiny,125m", "+recipe=bf16,fp8_delayed,mxfp8", "hardware=h100,b200",
                                 "trainer.seed=3", "recipe.skip_modules=[lm_head,attn]"])  # fmt: skip
    assert keys == ["model", "recipe", "hardware"]
    assert len(points) == 2 * 3 * 2
    assert points[0].overrides == ["model=tiny", "+recipe=bf16", "hardware=h100", "trainer.seed=3",
                                   "recipe.skip_modules=[lm_head,attn]"]  # fmt: skip
    assert points[1].values == {"model": "tiny", "recipe": "bf16", "hardware": "b200"}
    assert points[-1].values == {"model": "125m", "recipe": "mxfp8", "hardware": "b200"}
    combos = {tuple(p.values.values()) for p in points}
    assert len(combos) == 12  # every combination once
    _, ranged = sweep.expand(["nodes=range(1,4)"])
    assert [p.overrides for p in ranged] == [["nodes=1"], ["nodes=2"], ["nodes=3"]]
    _, single = sweep.expand(["model=tiny"])
    assert len(single) == 1 and single[0].values == {}


def test_each_point_is_the_single_prediction(swept, tmp_path, capsys):
    _, points = swept
    p = next(p for p in points if p.values == {"model": "20m", "recipe": "nvfp4", "hardware": "h100"})
    assert main(["--out", str(tmp_path / "one.json"), *p.overrides]) == 0
    capsys.readouterr()
    one = json.loads((tmp_path / "one.json").read_text())
    assert p.row["step_ms"] == pytest.approx(1e3 * one["prediction"]["summary"]["step_time_s"], rel=1e-12)
    assert p.row["speedup_over_bf16"] == pytest.approx(
        one["prediction"]["summary"]["speedup_over_bf16"], rel=1e-12
    )
    assert p.row["emulated_as"] == "fp8"  # H100 has no FP4 rate
    for q in points:
        assert (q.row["speedup_over_bf16"] == 1.0) == (q.values["recipe"] == "bf16")
        kinds = sum(v for k, v in q.row.items() if k.startswith("time_"))
        assert kinds == pytest.approx(q.row["step_ms"], rel=1e-9)  # the breakdown adds up to the step


def test_cli_sweep_writes_the_table_and_plots(tmp_path, capsys):
    out = tmp_path / "s"
    assert (
        main(["-m", "--out", str(out), "model=tiny", "+recipe=bf16,fp8_delayed", "hardware=h100,b200"]) == 0
    )
    printed = capsys.readouterr().out
    assert "4 point(s)" in printed and "| tiny | fp8_delayed | b200 |" in printed
    names = {p.name for p in out.iterdir()}
    assert names == {
        sweep.TABLE,
        sweep.MARKDOWN,
        sweep.JSON_FILE,
        "step_breakdown.png",
        "speedup_vs_model_size.png",
    }
    rows = list(csv.DictReader((out / sweep.TABLE).open()))
    assert [(r["recipe"], r["hardware"]) for r in rows] == [
        ("bf16", "h100"), ("bf16", "b200"), ("fp8_delayed", "h100"), ("fp8_delayed", "b200")
    ]  # fmt: skip
    assert {"step_ms", "speedup_over_bf16", "mfu_bf16_peak_pct", "memory_per_gpu_gb", "time_gemm_ms"} <= set(
        rows[0]
    )
    md = (out / sweep.MARKDOWN).read_text()
    assert md.count("\n| tiny |") == 4 and "python -m train.perfmodel -m model=tiny" in md
    doc = json.loads((out / sweep.JSON_FILE).read_text())
    assert doc["swept"] == ["recipe", "hardware"] and len(doc["points"]) == 4
    for png in ("step_breakdown.png", "speedup_vs_model_size.png"):
        assert (out / png).read_bytes()[:8] == PNG


def labelled(label: str) -> bool:
    return bool(re.search(r"\(.+\)", label))


def check_readable(fig: Figure) -> None:
    assert TITLE in fig.get_suptitle()
    assert fig.axes
    for ax in fig.axes:
        assert labelled(ax.get_xlabel()) and labelled(ax.get_ylabel()), (ax.get_xlabel(), ax.get_ylabel())
        assert ax.get_title()
        assert ax.get_legend() is not None or fig.legends, f"no legend: {ax.get_title()!r}"


def test_breakdown_plot_is_readable_and_draws_the_rows(swept):
    _, points = swept
    fig = breakdown_figure(points, title=TITLE)
    check_readable(fig)
    assert len(fig.axes) == 4  # model x hardware
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:2] == ["gemm", "cast"] and "optimizer" in legend
    ax = next(a for a in fig.axes if a.get_title().startswith("model=20m, hardware=b200"))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["bf16", "nvfp4"]
    stacked = np.sum([[bar.get_height() for bar in c] for c in ax.containers], axis=0)
    mine = [p for p in points if p.values["model"] == "20m" and p.values["hardware"] == "b200"]
    np.testing.assert_allclose(stacked, [p.row["step_ms"] for p in mine], rtol=1e-9)


def test_speedup_plot_is_readable_and_draws_the_rows(swept):
    _, points = swept
    fig = speedup_figure(points, title=TITLE)
    check_readable(fig)
    assert [ax.get_title() for ax in fig.axes] == ["hardware=h100", "hardware=b200"]
    ax = fig.axes[1]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"bf16", "nvfp4"}
    mine = sorted((p for p in points if p.values["hardware"] == "b200" and p.values["recipe"] == "nvfp4"),
                  key=lambda p: p.row["params"])  # fmt: skip
    np.testing.assert_allclose(lines["nvfp4"].get_xdata(), [p.row["params"] for p in mine])
    np.testing.assert_allclose(lines["nvfp4"].get_ydata(), [p.row["speedup_over_bf16"] for p in mine])
    np.testing.assert_array_equal(lines["bf16"].get_ydata(), 1.0)
    assert ax.get_xscale() == "log"  # model sizes grow geometrically
    h100 = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("emulated as fp8" in t for t in h100)  # NVFP4 on H100: open markers, said in the legend


@pytest.mark.parametrize(
    "arg, key",
    [
        ("model=tiny,nope", "model=nope"),
        ("hardware=h100,nope", "hardware=nope"),
        ("+recipe=bf16,nope", "recipe=nope"),
        ("model=tiny,tiny", "model=tiny,tiny"),
        ("model=tiny,", "model=tiny,"),
        ("launcher.nproc_per_node=1,16", "launcher.nproc_per_node=16"),
        ("nodes=glob(*)", "nodes=glob(*)"),
    ],
)
def test_bad_sweep_values_are_one_line_errors_and_write_nothing(arg, key, tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        main(["-m", "--out", str(out), arg])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lowbit: config error: {key}") and "\n" not in err, err
    assert not out.exists()


def test_a_key_given_twice_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["-m", "model=tiny", "model=20m"])
    assert "given twice" in capsys.readouterr().err


def test_crosscheck_rows_cite_a_note_line_or_say_not_in_the_notes():
    from pathlib import Path

    from bench.perfmodel_crosscheck import CHECKS, GAPS

    notes = Path("/work/shared/notes")
    for c in CHECKS:
        assert set(c.gaps) <= set(GAPS), c
        if c.published is None:
            assert c.source == "not in the notes here", c
            continue
        name, _, lines = c.source.partition(":")
        assert name.endswith(".md") and re.fullmatch(r"\d+([-,]\d+)?", lines), c.source
        if (notes / name).is_file():  # the notes are a shared folder, not part of the checkout
            count = len((notes / name).read_text().splitlines())
            assert all(int(n) <= count for n in re.split(r"[-,]", lines)), c.source
