"""The plots of a perfmodel sweep (``train.perfmodel.sweep``), as ``matplotlib.figure.Figure``
objects made directly (no pyplot, no backend switch), like ``train.review.plots``.

* ``breakdown_figure``: the predicted step time of each recipe as stacked bars by component
  kind (GEMMs, casts, attention, elementwise passes, recompute, optimizer, exposed
  communication), one panel per point of the other swept keys (model x hardware). Each panel
  has its own linear time axis: a stacked bar on a log axis misdraws its parts, and one shared
  axis would flatten the small models.
* ``speedup_figure``: the speedup over the same config's ``bf16`` step against the model size
  (parameters, log axis), a line per recipe, one panel per point of the swept keys other than
  the recipe and the model (e.g. per hardware). A point whose format the chip lacks (predicted
  emulated in the next-best family) has an open marker.

Every axes has x and y labels naming a unit or a count in parentheses, a title, and a legend
(the breakdown's is one figure legend for its panels, which share the kinds' colours); the
suptitle names the sweep. Recipe, model and hardware names come from the predictions only.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure
from matplotlib.patches import Patch

if TYPE_CHECKING:
    from train.perfmodel.sweep import Point

RECIPE_KEY, MODEL_KEY = "recipe", "model"
#: the component kinds of a predicted step (``train.perfmodel.step.Component.kind``, with the
#: communication left exposed after overlap), in the order the table and the plots show them
KIND_ORDER = ("gemm", "cast", "attention", "elementwise", "recompute", "optimizer", "comm (exposed)")
#: per recipe, so that two recipes predicted alike (the FP8 ones often are) stay visible
MARKERS, LINESTYLES = ("o", "s", "^", "D", "v", "P"), ("-", "-.", ":", "-")


def kind_column(kind: str) -> str:
    """The table column of a component kind's time per step."""
    return "time_" + re.sub(r"\W+", "_", kind).strip("_") + "_ms"


def _label(p: Point, exclude: set[str]) -> str:
    """The point's swept values minus the keys in ``exclude``."""
    return ", ".join(f"{k}={v}" for k, v in p.values.items() if k not in exclude) or "all points"


def _panels(points: list[Point], exclude: set[str]) -> dict[str, list[Point]]:
    out: dict[str, list[Point]] = {}
    for p in points:
        out.setdefault(_label(p, exclude), []).append(p)
    return out


def _grid(n: int, *, per_row: int, size: tuple[float, float]) -> tuple[Figure, list[Any]]:
    cols = max(1, min(per_row, n))
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        fig.delaxes(ax)
    return fig, axes[:n]


def breakdown_figure(points: list[Point], *, title: str) -> Figure:
    """Stacked bars of the step time by component kind, per recipe, a panel per model x hardware."""
    panels = _panels(points, {RECIPE_KEY})
    models = {p.row["model"] for p in points}
    fig, axes = _grid(len(panels), per_row=max(1, min(4, len(models))), size=(4.2, 3.6))
    kinds = [k for k in KIND_ORDER if any(p.row.get(kind_column(k), 0.0) > 0 for p in points)]
    colors = {k: f"C{i}" for i, k in enumerate(kinds)}
    for ax, (label, pts) in zip(axes, panels.items()):
        names = [p.row["recipe"] for p in pts]
        bottom = [0.0] * len(pts)
        for kind in kinds:
            heights = [p.row.get(kind_column(kind), 0.0) for p in pts]
            ax.bar(range(len(pts)), heights, bottom=bottom, color=colors[kind], label=kind, width=0.7)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_xticks(range(len(pts)), names, rotation=30, ha="right")
        ax.set_xlabel("recipe (preset)")
        ax.set_ylabel("predicted step time (ms)")
        over = [p.row["recipe"] for p in pts if not p.row["fits_in_hbm"]]
        ax.set_title(label + (f"\nover HBM per GPU: {', '.join(over)}" if over else ""), fontsize=9)
    handles = [Patch(color=colors[k], label=k) for k in kinds]
    fig.legend(handles=handles, title="component (kind)", loc="outside right upper")
    fig.suptitle(f"{title}: predicted step time by component, per recipe")
    return fig


def speedup_figure(points: list[Point], *, title: str) -> Figure:
    """Speedup over bf16 against parameters, a line per recipe, a panel per hardware (etc.)."""
    panels = _panels(points, {RECIPE_KEY, MODEL_KEY})
    fig, axes = _grid(len(panels), per_row=3, size=(5.0, 3.8))
    recipes = list(dict.fromkeys(p.row["recipe"] for p in points))
    colors = {r: f"C{i % 10}" for i, r in enumerate(recipes)}
    for ax, (label, pts) in zip(axes, panels.items()):
        sizes = sorted({p.row["params"] for p in pts})
        for i, recipe in enumerate(recipes):
            mine = sorted((p for p in pts if p.row["recipe"] == recipe), key=lambda p: p.row["params"])
            if not mine:
                continue
            xs = [p.row["params"] for p in mine]
            ys = [p.row["speedup_over_bf16"] for p in mine]
            ref = all(y == 1.0 for y in ys)  # the speedup's own denominator: drawn as the reference
            ax.plot(xs, ys, marker=MARKERS[i % len(MARKERS)], color="black" if ref else colors[recipe],
                    linestyle="--" if ref else LINESTYLES[i % len(LINESTYLES)], label=recipe,
                    markersize=8 - 1.5 * (i % 3))  # fmt: skip
            emu = [(x, y) for x, y, p in zip(xs, ys, mine) if p.row["emulated_as"]]
            if emu:
                ax.scatter(*zip(*emu), s=60, facecolors="white", edgecolors=colors[recipe], zorder=3,
                           label=f"{recipe}: emulated as {mine[0].row['emulated_as']}")  # fmt: skip
        if len(sizes) > 1 and sizes[0] > 0:  # model sizes grow geometrically
            ax.set_xscale("log")
        ax.set_xlabel("model size (parameters, #)")
        ax.set_ylabel("speedup over bf16 step time (x)")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}: predicted speedup over bf16 vs model size")
    return fig
