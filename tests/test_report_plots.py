"""The report's figures (``train.review.plots``) on synthetic runs: which plots exist, the numbers
they draw, and the readability rules, checked by introspecting every figure."""

from __future__ import annotations

import re

import numpy as np
import pytest
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from train.review.compare import ReportConfig, compare
from train.review.plots import Plot, figures, save
from train.review.runs import Run
from train.review.series import from_rows

TITLE = "synthetic-sweep"
REF = "bf16"
LOWP = "lowp"  # the quantized recipe of the synthetic sweep (a name from the data, as in a real one)
STEPS = np.arange(1, 41)
STAT_STEPS = (10, 20, 30, 40)
LAYERS = ("blocks.0.attn.qkv", "blocks.0.mlp.fc", "lm_head")
SHADOWS = {"fmt_a": 1e-1, "fmt_b": 1e-4}  # shadow format -> underflow scale (spans 3 decades)
GBS, SEQ = 8, 32
TPS = {REF: 100_000.0, LOWP: 500.0}  # throughput spans 2.3 decades: a log axis
MEM = {REF: 1.0, LOWP: 1.5}
PNG = b"\x89PNG\r\n\x1a\n"


def loss_curve(recipe: str, seed: int) -> np.ndarray:
    base = 4.0 * np.exp(-STEPS / 15.0) + 2.0 + 0.03 * seed * np.sin(STEPS)
    return base + (0.05 + 0.01 * seed if recipe != REF else 0.0)


def underflow(layer: int, step: int, seed: int) -> float:
    """Spans four decades over layers; exactly 0 for the last layer at the first stat step."""
    if layer == 2 and step == STAT_STEPS[0]:
        return 0.0
    return 0.3 * 10.0 ** (-2 * layer) * (1 + 0.1 * seed) * (1 + step / 100)


def make_run(recipe: str, seed: int, *, stats: bool = True, perf: bool = True, loss=None, extra=None) -> Run:
    loss = loss_curve(recipe, seed) if loss is None else loss
    rows = []
    for i, step in enumerate(STEPS):
        row = {"step": int(step), "train/loss": float(loss[i])}
        if perf:
            row |= {"perf/tokens_per_s": TPS[recipe] * (1 + 0.01 * seed), "perf/max_rss_gib": MEM[recipe]}
        if stats and recipe != REF and step in STAT_STEPS:
            for j, layer in enumerate(LAYERS):
                row[f"grad/{layer}/underflow_frac"] = underflow(j, int(step), seed)
                row[f"grad/{layer}/sqnr_db"] = 20.0 + j + 0.1 * seed
                for fmt, scale in SHADOWS.items():
                    row[f"shadow/{fmt}/{layer}/underflow_frac"] = scale * (1 + j)
                    row[f"shadow/{fmt}/{layer}/sqnr_db"] = 10.0 / scale**0.1 + j
        if extra:
            row |= extra(i, int(step))
        rows.append(row)
    backend = "native" if recipe == REF else "emulated"
    config = {
        "config": {
            "model": {"name": "tiny", "seq_len": SEQ},
            "data": {"name": "synthetic"},
            "trainer": {"seed": seed, "global_batch_size": GBS},
            "recipe": {"name": recipe, "backend": backend},
        }
    }
    return Run(f"{recipe}-s{seed}", recipe, seed, "completed", from_rows(rows), config=config)


def sweep(seeds=(1, 2, 3), **kw) -> list[Run]:
    return [make_run(recipe, s, **kw) for recipe in (REF, LOWP) for s in seeds]


def plots_of(runs: list[Run], **cfg) -> dict[str, Plot]:
    return {p.name: p for p in figures(compare(runs, ReportConfig(**cfg)), title=TITLE)}


@pytest.fixture(scope="module")
def full() -> dict[str, Plot]:
    return plots_of(sweep())


# ---- the readability rules ------------------------------------------------------------------------


def data_axes(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def positive_span(values: np.ndarray) -> float:
    v = values[np.isfinite(values)]
    return float(np.log10(v.max() / v.min())) if len(v) and v.min() > 0 else 0.0


def check_readable(fig: Figure) -> None:
    sup = fig.get_suptitle()
    assert TITLE in sup and f"vs reference {REF}" in sup, sup
    for ax in fig.axes:
        labels = [ax.get_ylabel()] if ax.get_label() == "<colorbar>" else [ax.get_xlabel(), ax.get_ylabel()]
        for label in labels:
            assert re.search(r"\(.+\)", label), f"axis label {label!r} names no unit or count"
    for ax in data_axes(fig):
        num_series = len(ax.get_lines()) + len(ax.containers)
        if num_series > 1:
            assert ax.get_legend() is not None, f"{num_series} series and no legend: {ax.get_title()!r}"
        ys = [np.asarray(line.get_ydata(), float) for line in ax.get_lines()]
        ys += [
            np.asarray([p.get_height() for p in c], float)
            for c in ax.containers
            if c.orientation == "vertical"
        ]
        xs = [
            np.asarray([p.get_width() for p in c], float)
            for c in ax.containers
            if c.orientation == "horizontal"
        ]
        for values, scale in ((ys, ax.get_yscale()), (xs, ax.get_xscale())):
            if values and positive_span(np.concatenate(values)) > 2:
                assert scale == "log", f"values span > 2 decades on a linear axis: {ax.get_title()!r}"
        for im in ax.images:
            if positive_span(np.asarray(im.get_array(), float).ravel()) > 2:
                assert isinstance(im.norm, LogNorm), "colour scale spans > 2 decades and is linear"


def test_readability_check_can_fail():
    fig = Figure()
    fig.suptitle(f"{TITLE}: x vs reference {REF}")
    ax = fig.subplots()
    ax.plot([0, 1], [1, 1000])
    ax.plot([0, 1], [2, 3])
    ax.set_xlabel("optimizer step (#)")
    with pytest.raises(AssertionError, match="no unit"):
        check_readable(fig)
    ax.set_ylabel("loss (nats/token)")
    with pytest.raises(AssertionError, match="no legend"):
        check_readable(fig)
    ax.legend(["a", "b"])
    with pytest.raises(AssertionError, match="decades"):
        check_readable(fig)
    ax.set_yscale("log")
    check_readable(fig)


def test_every_figure_is_readable(full):
    diverged = plots_of(diverging_sweep())
    bare = plots_of(sweep(seeds=(1,), stats=False, perf=False))
    for plots in (full, diverged, bare):
        for p in plots.values():
            assert p.question.endswith("?"), p.question
            check_readable(p.figure)


# ---- which plots, and what they draw --------------------------------------------------------------


def test_expected_plots(full):
    assert list(full) == [
        "loss_curves",
        "loss_vs_tokens",
        "loss_delta",
        "grad_underflow",
        "grad_sqnr",
        "shadow_formats",
        "throughput",
    ]  # no "divergence": nothing diverged


def line(ax, gid: str):
    found = [x for x in ax.get_lines() if x.get_gid() == gid]
    assert len(found) == 1, [x.get_gid() for x in ax.get_lines()]
    return found[0]


def test_loss_curves_are_seed_means(full):
    ax = data_axes(full["loss_curves"].figure)[0]
    assert sorted(x.get_gid() for x in ax.get_lines()) == [REF, LOWP]
    for recipe in (REF, LOWP):
        got = line(ax, recipe)
        np.testing.assert_array_equal(got.get_xdata(), STEPS)
        np.testing.assert_allclose(
            got.get_ydata(), np.mean([loss_curve(recipe, s) for s in (1, 2, 3)], axis=0)
        )
    ref = line(ax, REF)
    assert ref.get_linestyle() == "--" and ref.get_color() == "black"
    assert line(ax, LOWP).get_linestyle() == "-"
    tokens = data_axes(full["loss_vs_tokens"].figure)[0]
    np.testing.assert_array_equal(line(tokens, LOWP).get_xdata(), STEPS * GBS * SEQ)
    assert tokens.get_xlabel() == "tokens seen (#)"


def test_loss_delta_and_noise_band(full):
    ax_d, ax_r = data_axes(full["loss_delta"].figure)
    deltas = np.asarray([loss_curve(LOWP, s) - loss_curve(REF, s) for s in (1, 2, 3)])
    rel = np.asarray([(loss_curve(LOWP, s) - loss_curve(REF, s)) / loss_curve(REF, s) for s in (1, 2, 3)])
    np.testing.assert_allclose(line(ax_d, LOWP).get_ydata(), deltas.mean(axis=0))
    np.testing.assert_allclose(line(ax_r, LOWP).get_ydata(), 100 * rel.mean(axis=0))
    assert REF not in {x.get_gid() for x in ax_d.get_lines()}
    refs = np.asarray([loss_curve(REF, s) for s in (1, 2, 3)])
    band = [c for c in ax_d.collections if c.get_gid() == "noise"]
    assert len(band) == 1
    top = band[0].get_paths()[0].vertices[:, 1].max()
    assert top == pytest.approx(2.0 * refs.std(axis=0, ddof=1).max())  # z = 2 (ReportConfig default)
    rel_band = next(c for c in ax_r.collections if c.get_gid() == "noise").get_paths()[0].vertices
    expected = 100 * 2.0 * refs.std(axis=0, ddof=1) / refs.mean(axis=0)
    assert rel_band[:, 1].max() == pytest.approx(expected.max())
    z3 = plots_of(sweep(), z=3.0)["loss_delta"].figure
    top3 = next(c for c in data_axes(z3)[0].collections if c.get_gid() == "noise").get_paths()[0].vertices
    assert top3[:, 1].max() == pytest.approx(1.5 * top)


def test_loss_delta_uses_a_runs_own_reference():
    def own(i, step):
        return {"div/loss_delta": 0.25, "div/loss_rel": 0.1}

    runs = [make_run(REF, s) for s in (1, 2)] + [make_run(LOWP, s, extra=own) for s in (1, 2)]
    ax_d, ax_r = data_axes(plots_of(runs)["loss_delta"].figure)
    np.testing.assert_allclose(line(ax_d, LOWP).get_ydata(), 0.25)
    np.testing.assert_allclose(line(ax_r, LOWP).get_ydata(), 10.0)


def diverging_sweep() -> list[Run]:
    loss = loss_curve(LOWP, 2).copy()
    loss[STEPS >= 25] = np.nan
    return [make_run(REF, s) for s in (1, 2)] + [make_run(LOWP, 1), make_run(LOWP, 2, loss=loss)]


def test_divergence_plot():
    fig = plots_of(diverging_sweep())["divergence"].figure
    (ax,) = data_axes(fig)
    widths = [p.get_width() for c in ax.containers for p in c]
    assert widths == [25]  # the first non-finite step of the seed that diverged
    texts = [t.get_text() for t in ax.texts]
    assert texts.count("none") == 3  # bf16 on both series, lowp never drifted (no summary)
    assert [t.get_text() for t in ax.get_yticklabels()] == [REF, LOWP]


def test_heatmaps(full):
    fig = full["grad_underflow"].figure
    (ax,) = data_axes(fig)
    (im,) = ax.images
    assert isinstance(im.norm, LogNorm)
    smallest = min(underflow(2, st, s) for st in STAT_STEPS[1:] for s in (1, 2, 3))
    assert im.norm.vmin < smallest  # the exact zero is clipped below the smallest positive value
    grid = np.asarray(im.get_array())
    assert grid.shape == (len(LAYERS), len(STAT_STEPS))
    assert grid[0, 1] == pytest.approx(np.mean([underflow(0, 20, s) for s in (1, 2, 3)]))
    assert grid[2, 0] == im.norm.vmin  # the zero is drawn at the floor, not left out as a bad value
    assert [t.get_text() for t in ax.get_yticklabels()] == list(LAYERS)
    cbar = next(a for a in fig.axes if a.get_label() == "<colorbar>")
    assert cbar.get_ylabel().startswith("underflow fraction (0-1)") and "0 drawn at" in cbar.get_ylabel()
    sqnr = full["grad_sqnr"].figure
    (im,) = data_axes(sqnr)[0].images
    assert not isinstance(im.norm, LogNorm)
    assert next(a for a in sqnr.axes if a.get_label() == "<colorbar>").get_ylabel() == "SQNR (dB)"


def test_shadow_formats(full):
    ax_u, ax_s = data_axes(full["shadow_formats"].figure)
    assert [t.get_text() for t in ax_u.get_xticklabels()] == list(SHADOWS)
    heights = [p.get_height() for p in ax_u.containers[0]]
    np.testing.assert_allclose(heights, [scale * 2.0 for scale in SHADOWS.values()])  # mean of 1, 2, 3
    assert ax_u.get_yscale() == "log" and ax_s.get_yscale() == "linear"


def test_throughput(full):
    axes = data_axes(full["throughput"].figure)
    assert [ax.get_ylabel() for ax in axes] == ["throughput (tokens/s)", "peak memory (GiB)"]  # no MFU
    assert axes[0].get_yscale() == "log" and axes[1].get_yscale() == "linear"
    assert [t.get_text() for t in axes[0].get_xticklabels()] == [f"{REF}\n(native)", f"{LOWP}\n(emulated)"]
    heights = [p.get_height() for p in axes[0].containers[0]]
    np.testing.assert_allclose(heights, [TPS[REF] * 1.02, TPS[LOWP] * 1.02])  # mean of seeds 1..3
    runs = sweep(seeds=(1, 2), extra=lambda i, step: {"perf/mfu_bf16_peak": 0.25})
    mfu = data_axes(plots_of(runs)["throughput"].figure)[2]
    assert mfu.get_ylabel() == "MFU vs dense BF16 peak (%)"
    np.testing.assert_allclose([p.get_height() for p in mfu.containers[0]], [25.0, 25.0])


def test_plots_without_data_are_left_out():
    bare = plots_of(sweep(seeds=(1,), stats=False, perf=False))
    assert list(bare) == ["loss_curves", "loss_vs_tokens", "loss_delta"]
    ax_d = data_axes(bare["loss_delta"].figure)[0]
    assert not [c for c in ax_d.collections if c.get_gid() == "noise"]  # one reference seed: no noise band
    only_ref = plots_of([make_run(REF, s, stats=False, perf=False) for s in (1, 2)])
    assert list(only_ref) == ["loss_curves", "loss_vs_tokens"]
    no_tokens = [make_run(REF, 1, perf=False)]
    no_tokens[0].config["config"]["trainer"]["global_batch_size"] = 0
    assert list(plots_of(no_tokens)) == ["loss_curves"]


def test_save_writes_pngs(tmp_path, full):
    chosen = [full["loss_curves"], full["grad_underflow"]]
    paths = save(chosen, tmp_path / "plots")
    assert [p.name for p in paths] == ["loss_curves.png", "grad_underflow.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == PNG and len(data) > 5000
