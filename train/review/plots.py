"""The report's figures, one question each, drawn from a ``Comparison`` (no files read here).

``figures(cmp, title=...)`` returns ``Plot`` records (file stem, ``Figure``, the question it
answers); ``save(plots, out_dir)`` writes PNG files. A plot whose data no run has (no ``grad/``
statistics, no shadow formats, no divergence, no perf keys) is left out, not drawn empty. Figures
are ``matplotlib.figure.Figure`` made directly: no pyplot, no global registry, no backend switch.

Readability rules every figure keeps (``tests/test_report_plots.py`` checks them):

* every axes has an x and a y label naming a unit or a count in parentheses;
* every axes with more than one line or bar series has a legend;
* the suptitle names the sweep and the reference recipe (``"<title>: <what> vs reference bf16"``);
* a value axis whose positive values span more than two decades is logarithmic (the underflow
  heatmap's colour scale too: ``LogNorm``, zeros drawn a decade below the smallest positive
  value). Step and token axes stay linear: they are a training run's time axis.

Means over seeds are taken at each step over the seeds that logged it; a seed whose loss went
non-finite makes the mean non-finite there (the line stops) rather than being averaged away.
Recipe, layer and shadow format names come from the data only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from train.review.compare import LOSS, Comparison, RecipeRow
from train.review.runs import Run
from train.review.verdict import first_nonfinite_step

STEP_LABEL = "optimizer step (#)"
LOSS_LABEL = "train loss (nats/token)"
RECIPE_LABEL = "recipe (backend)"
DECADES = 2.0  # a positive value axis spanning more than this many decades is drawn on a log scale
UNDERFLOW, SQNR = "underflow_frac", "sqnr_db"
MAX_TICKS = 40  # tick labels per heatmap axis at most (layer names thinned beyond it)


@dataclass
class Plot:
    name: str  # file stem: ``<name>.png``
    figure: Figure
    question: str  # one sentence: what the plot answers


@dataclass
class SeedStats:
    """Seeds' curves on the union of their steps: mean, min, max, std (ddof=1; NaN below 2 seeds)."""

    x: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    std: np.ndarray
    num_seeds: int


def seed_stats(curves: list[tuple[np.ndarray, np.ndarray]]) -> SeedStats | None:
    curves = [(np.asarray(s), np.asarray(v, dtype=np.float64)) for s, v in curves if len(s)]
    if not curves:
        return None
    x = np.unique(np.concatenate([s for s, _ in curves]))
    vals = np.zeros((len(curves), len(x)))
    logged = np.zeros(vals.shape, dtype=bool)
    for i, (s, v) in enumerate(curves):
        idx = np.searchsorted(x, s)
        vals[i, idx], logged[i, idx] = v, True
    n = logged.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(logged, vals, 0.0).sum(axis=0) / n
        lo = np.where(logged, vals, np.inf).min(axis=0)
        hi = np.where(logged, vals, -np.inf).max(axis=0)
        dev = np.where(logged, vals - mean, 0.0)
        std = np.where(n > 1, np.sqrt((dev**2).sum(axis=0) / np.maximum(n - 1, 1)), np.nan)
    mean, lo, hi, std = (np.where(np.isfinite(a), a, np.nan) for a in (mean, lo, hi, std))
    return SeedStats(x, mean, lo, hi, std, num_seeds=len(curves))


def figures(cmp: Comparison, *, title: str) -> list[Plot]:
    """The report's plots for one comparison, in reading order; those without data are left out."""
    out = []
    for name, heading, question, make in _PLOTS:
        fig = make(cmp)
        if fig is not None:
            fig.suptitle(f"{title}: {heading} vs reference {cmp.config.reference}")
            out.append(Plot(name, fig, question))
    return out


def save(plots: list[Plot], out_dir: str | Path, *, dpi: int = 100) -> list[Path]:
    """Write ``<name>.png`` per plot. The figures belong to no pyplot registry, so there is nothing
    to close: they are freed with the ``Plot`` records."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    paths = [Path(out_dir) / f"{p.name}.png" for p in plots]
    for p, path in zip(plots, paths):
        p.figure.savefig(path, dpi=dpi, bbox_inches="tight")
    return paths


def decades(values: np.ndarray | list[float]) -> float:
    """log10(max / min) of the finite positive values (0 when there are none)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v) & (v > 0)]
    return math.log10(v.max() / v.min()) if len(v) else 0.0


def _log_if_wide(ax: Axes, values: list[np.ndarray], *, axis: str = "y") -> None:
    flat = np.concatenate([np.ravel(v) for v in values]) if values else np.zeros(0)
    flat = flat[np.isfinite(flat)]
    if len(flat) and flat.min() > 0 and decades(flat) > DECADES:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def _colors(cmp: Comparison) -> dict[str, str]:
    others = [r.recipe for r in cmp.rows if r.recipe != cmp.config.reference]
    return {cmp.config.reference: "black"} | {name: f"C{i % 10}" for i, name in enumerate(others)}


def _curve(ax: Axes, st: SeedStats, *, recipe: str, color: str, ref: bool, scale: float = 1.0) -> list:
    """The seed mean as a line (gid = recipe), a min..max band when there are several seeds."""
    label = f"{recipe} ({st.num_seeds} seed{'s' * (st.num_seeds > 1)}{', reference' * ref})"
    ls, lw, zorder = ("--", 2.0, 3) if ref else ("-", 1.5, 2)
    (line,) = ax.plot(st.x, st.mean * scale, label=label, color=color, ls=ls, lw=lw, zorder=zorder)
    line.set_gid(recipe)
    if st.num_seeds > 1:
        ax.fill_between(st.x, st.lo * scale, st.hi * scale, color=color, alpha=0.15, lw=0, label="_band")
    return [st.mean * scale, st.lo * scale, st.hi * scale]


# ---- the plots -----------------------------------------------------------------------------------


def _loss_x(run: Run, *, tokens: bool) -> tuple[np.ndarray, np.ndarray]:
    s, v = run.series.get(LOSS)
    return (s * run.tokens_per_step if tokens else s), v


def _loss(cmp: Comparison, *, tokens: bool) -> Figure | None:
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax, colors, plotted = fig.subplots(), _colors(cmp), []
    for row in cmp.rows:
        runs = [r for r in row.runs if r.tokens_per_step > 0] if tokens else row.runs
        st = seed_stats([_loss_x(r, tokens=tokens) for r in runs])
        if st is not None:
            ref = row.recipe == cmp.config.reference
            plotted += _curve(ax, st, recipe=row.recipe, color=colors[row.recipe], ref=ref)
    if not plotted:
        return None
    _log_if_wide(ax, plotted)
    ax.set_xlabel("tokens seen (#)" if tokens else STEP_LABEL)
    ax.set_ylabel(LOSS_LABEL)
    ax.set_title("mean over seeds; band: min..max over seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def run_delta(run: Run, ref: Run | None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(steps, loss - reference loss, that / reference loss) of one run: its own ``div/`` keys when
    it trained against a reference, else its same-seed reference run at the steps both logged."""
    if run.has_own_reference:  # the tracker logs both keys in the same row
        (s, d), (rs, rel) = run.series.get("div/loss_delta"), run.series.get("div/loss_rel")
        common, ia, ib = np.intersect1d(s, rs, return_indices=True)
        return common, d[ia], rel[ib]
    if ref is None or ref is run:
        return None
    (s, v), (rs, rv) = run.series.get(LOSS), ref.series.get(LOSS)
    common, ia, ib = np.intersect1d(s, rs, return_indices=True)
    if not len(common):
        return None
    delta = v[ia] - rv[ib]
    with np.errstate(invalid="ignore", divide="ignore"):
        return common, delta, delta / rv[ib]


def _loss_delta(cmp: Comparison) -> Figure | None:
    colors, ref_name = _colors(cmp), cmp.config.reference
    per_recipe = []
    for row in (r for r in cmp.rows if r.recipe != ref_name):
        d = [x for r in row.runs if (x := run_delta(r, cmp.references.get(r.seed))) is not None]
        st_d, st_r = seed_stats([(s, a) for s, a, _ in d]), seed_stats([(s, b) for s, _, b in d])
        if st_d is not None and st_r is not None:
            per_recipe.append((row.recipe, st_d, st_r))
    if not per_recipe:
        return None
    fig = Figure(figsize=(12, 5), layout="constrained")
    ax_d, ax_r = fig.subplots(1, 2, sharex=True)
    noise = seed_stats([r.series.get(LOSS) for r in cmp.references.values()])
    if noise is not None and noise.num_seeds >= 2:
        z = cmp.config.z
        label = f"reference seed noise (±{z:g} std over {noise.num_seeds} seeds)"
        for ax, scale in ((ax_d, z * noise.std), (ax_r, 100 * z * noise.std / noise.mean)):
            band = ax.fill_between(noise.x, -scale, scale, color="grey", alpha=0.3, lw=0, label=label)
            band.set_gid("noise")
    for recipe, st_d, st_r in per_recipe:
        _curve(ax_d, st_d, recipe=recipe, color=colors[recipe], ref=False)
        _curve(ax_r, st_r, recipe=recipe, color=colors[recipe], ref=False, scale=100.0)
    for ax, ylabel, what in (
        (ax_d, "loss delta (nats/token)", "loss - same-seed reference loss"),
        (ax_r, "relative loss delta (%)", "(loss - reference) / reference loss"),
    ):
        ax.axhline(0.0, color="black", lw=0.8, label="_zero")
        ax.set_xlabel(STEP_LABEL)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{what}; mean over seeds, band min..max", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def divergence_steps(row: RecipeRow) -> tuple[int | None, int | None]:
    """(first step the loss drifted from the reference past the threshold, first non-finite loss step)."""
    bad = [s for r in row.runs if (s := first_nonfinite_step(*r.series.get(LOSS))) is not None]
    return row.divergence_step, (min(bad) if bad else None)


def _divergence(cmp: Comparison) -> Figure | None:
    steps = [divergence_steps(row) for row in cmp.rows]
    if all(a is None and b is None for a, b in steps):
        return None
    fig = Figure(figsize=(8, 1.5 + 0.6 * len(steps)), layout="constrained")
    ax, y = fig.subplots(), np.arange(len(steps))
    series = (("loss drifted from the reference (rel. EMA > threshold)", "C1"), ("loss non-finite", "C3"))
    for k, (label, color) in enumerate(series):
        off = (k - 0.5) * 0.38
        has = [i for i, s in enumerate(steps) if s[k] is not None]
        ax.barh(
            y[has] + off, np.asarray([steps[i][k] for i in has], float), height=0.36, color=color, label=label
        )
        for i in set(range(len(steps))) - set(has):
            ax.text(0.01, y[i] + off, "none", transform=ax.get_yaxis_transform(), va="center", fontsize=8)
    _log_if_wide(ax, [np.asarray([v for s in steps for v in s if v is not None], dtype=float)], axis="x")
    ax.set_yticks(y, [row.recipe for row in cmp.rows])
    ax.set_ylim(len(steps) - 0.5, -0.5)  # first recipe on top; room for the "none" notes
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel("recipe (name)")
    handles = [Patch(color=color, label=label) for label, color in series]  # a series may have no bar
    ax.legend(handles=handles, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2)
    return fig


def layer_grid(runs: list[Run], stat: str) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """(layers, stat steps, mean over seeds as a layers x steps array; NaN where no seed logged a
    finite value) of ``grad/<layer>/<stat>``."""
    suffix = "/" + stat
    layers = list(dict.fromkeys(k[5 : -len(suffix)] for r in runs for k in r.series.keys()
                                if k.startswith("grad/") and k.endswith(suffix)))  # fmt: skip
    if not layers:
        return None
    steps = np.unique(np.concatenate([r.series.get(f"grad/{la}{suffix}")[0] for r in runs for la in layers]))
    total, count = np.zeros((len(layers), len(steps))), np.zeros((len(layers), len(steps)))
    for r in runs:
        for i, la in enumerate(layers):
            s, v = r.series.get(f"grad/{la}{suffix}")
            ok = np.isfinite(v)
            np.add.at(total[i], np.searchsorted(steps, s[ok]), v[ok])
            np.add.at(count[i], np.searchsorted(steps, s[ok]), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return layers, steps, np.where(count > 0, total / count, np.nan)


def _num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def _heatmap(cmp: Comparison, stat: str, cbar_label: str, cmap: str) -> Figure | None:
    grids = [(row.recipe, g) for row in cmp.rows if (g := layer_grid(row.runs, stat)) is not None]
    values = np.concatenate([g[np.isfinite(g)] for _, (_, _, g) in grids]) if grids else np.zeros(0)
    if not len(values):
        return None
    positive, floor = values[values > 0], None
    if stat == UNDERFLOW and decades(positive) > DECADES:
        zeros = bool((values <= 0).any())  # drawn a decade below the smallest positive value
        floor = float(positive.min()) / (10.0 if zeros else 1.0)
        norm: Normalize = LogNorm(floor, float(positive.max()))
        cbar_label += f"; 0 drawn at {floor:.0e}" if zeros else ""
    else:
        norm = Normalize(float(values.min()), float(values.max()))
    ncols, num_layers = min(3, len(grids)), max(len(la) for _, (la, _, _) in grids)
    nrows, height = math.ceil(len(grids) / ncols), min(12.0, max(3.0, 0.28 * num_layers + 1.5))
    fig = Figure(figsize=(5.5 * ncols + 1.5, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colormap = matplotlib.colormaps[cmap].with_extremes(bad="lightgrey")
    for ax, (recipe, (layers, steps, grid)) in zip(axes, grids):
        shown = grid if floor is None else np.maximum(grid, floor)  # LogNorm: zeros at the floor
        im = ax.imshow(shown, aspect="auto", norm=norm, cmap=colormap, interpolation="nearest")
        ys, xs = (np.arange(0, n, max(1, math.ceil(n / MAX_TICKS))) for n in (len(layers), len(steps)))
        ax.set_yticks(ys, [layers[i] for i in ys], fontsize=7)
        ax.set_xticks(xs, [str(steps[i]) for i in xs], fontsize=7)
        if grid.size <= 150:  # small grids: the value in each cell
            for (i, j), v in np.ndenumerate(grid):
                if np.isfinite(v):
                    color = "black" if norm(shown[i, j]) > 0.5 else "white"
                    ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=6, color=color)
        ax.set_title(recipe, fontsize=10)
        ax.set_xlabel("stat step (optimizer step #)")
        ax.set_ylabel("layer (module name)")
    for ax in axes[len(grids) :]:
        fig.delaxes(ax)
    fig.colorbar(im, ax=list(axes[: len(grids)]), label=cbar_label)
    return fig


def shadow_means(runs: list[Run], stat: str) -> dict[str, float]:
    """Per shadow format: mean of ``shadow/<format>/<layer>/<stat>`` over layers, stat steps and seeds."""
    acc: dict[str, list[np.ndarray]] = {}
    for r in runs:
        for k in r.series.keys():
            parts = k.split("/")
            if parts[0] == "shadow" and len(parts) >= 4 and parts[-1] == stat:
                v = r.series.get(k)[1]
                acc.setdefault(parts[1], []).append(v[np.isfinite(v)])
    return {f: float(np.concatenate(v).mean()) for f, v in acc.items() if sum(map(len, v))}


def _shadow(cmp: Comparison) -> Figure | None:
    colors = _colors(cmp)
    data = {
        stat: {row.recipe: m for row in cmp.rows if (m := shadow_means(row.runs, stat))}
        for stat in (UNDERFLOW, SQNR)
    }
    if not any(data.values()):
        return None
    fig = Figure(figsize=(12, 5), layout="constrained")
    panels = (
        (UNDERFLOW, "mean underflow fraction (0-1)", "dY below the format's smallest subnormal"),
        (SQNR, "mean SQNR (dB)", "signal-to-quantization-noise ratio of dY"),
    )
    for ax, (stat, ylabel, what) in zip(fig.subplots(1, 2), panels):
        by_recipe = data[stat]
        formats = list(dict.fromkeys(f for m in by_recipe.values() for f in m))
        x, width = np.arange(len(formats)), 0.8 / max(1, len(by_recipe))
        heights = []
        for j, (recipe, means) in enumerate(by_recipe.items()):
            idx = [i for i, f in enumerate(formats) if f in means]
            h = [means[formats[i]] for i in idx]
            off = (j - (len(by_recipe) - 1) / 2) * width
            bars = ax.bar(x[idx] + off, h, width, label=recipe, color=colors[recipe])
            ax.bar_label(bars, fmt=_num, fontsize=7)
            heights.append(np.asarray(h))
        if stat == UNDERFLOW:
            _log_if_wide(ax, heights)
        ax.set_xticks(x, formats, fontsize=8)
        ax.set_xlabel("shadow format (name)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{what}; mean over layers, stat steps, seeds", fontsize=9)
        ax.legend(title="training recipe", fontsize=8)
    return fig


def _throughput(cmp: Comparison) -> Figure | None:
    mfu = lambda r: None if r.mfu is None else 100 * r.mfu
    panels = [
        ("throughput (tokens/s)", "mean over logged steps and seeds", lambda r: r.tokens_per_s),
        ("peak memory (GiB)", "GPU max allocated, or process max RSS on CPU", lambda r: r.memory_gib),
        ("MFU vs dense BF16 peak (%)", "model FLOPs utilization", mfu),
    ]
    panels = [p for p in panels if any(p[2](r) is not None for r in cmp.rows)]
    if not panels:
        return None
    colors = _colors(cmp)
    fig = Figure(figsize=(4.5 * len(panels) + 1, 5), layout="constrained")
    for ax, (ylabel, what, get) in zip(np.ravel(fig.subplots(1, len(panels))), panels):
        rows = [r for r in cmp.rows if get(r) is not None]
        vals = np.asarray([get(r) for r in rows], dtype=float)
        bars = ax.bar(np.arange(len(rows)), vals, color=[colors[r.recipe] for r in rows], width=0.6)
        ax.bar_label(bars, fmt=_num, fontsize=8)
        _log_if_wide(ax, [vals])
        ax.set_xticks(np.arange(len(rows)), [f"{r.recipe}\n({r.backend})" for r in rows], fontsize=8)
        ax.set_xlabel(RECIPE_LABEL)
        ax.set_ylabel(ylabel)
        ax.set_title(what, fontsize=9)
    return fig


_PLOTS = (
    ("loss_curves", "training loss", "Does each recipe's loss track the reference's, step for step?",
     lambda c: _loss(c, tokens=False)),
    ("loss_vs_tokens", "training loss per token", "Does each recipe's loss track the reference's for the same tokens seen?",
     lambda c: _loss(c, tokens=True)),
    ("loss_delta", "loss gap", "Is each recipe's gap to its same-seed reference larger than the reference's own seed noise?",
     _loss_delta),
    ("divergence", "divergence", "When, if ever, did each recipe's loss leave the reference or go non-finite?",
     _divergence),
    ("grad_underflow", "output-gradient underflow", "Which layers lose how much of dY to underflow, and when?",
     lambda c: _heatmap(c, UNDERFLOW, "underflow fraction (0-1)", "magma")),
    ("grad_sqnr", "output-gradient SQNR", "How much quantization noise does each layer's dY carry, and when?",
     lambda c: _heatmap(c, SQNR, "SQNR (dB)", "viridis")),
    ("shadow_formats", "shadow formats", "Would another format lose less of the same gradients?", _shadow),
    ("throughput", "throughput and memory", "What does each recipe cost in speed and memory?", _throughput),
)  # fmt: skip
