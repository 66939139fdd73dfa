"""The sweep report as a W&B Report (``wandb_workspaces.reports.v2``): the HTML report's structure,
with live W&B panels in place of the PNG plots.

Blocks, in order: the title (H1); a note (runs, reference recipe, W&B group); the summary table
(``train.review.compare.table``, as Markdown); the verdict rule (``train.review.verdict.RULE``);
the runs refused from the comparison; one panel grid per question (loss; divergence from the
reference; gradient underflow and SQNR; throughput and MFU); the runs with their states.

Every panel grid has one runset, filtered to the sweep's W&B group (``Metric("Group") == <group>``:
lowbit runs log ``group=logger.wandb.group``) and grouped by ``config.recipe.name`` (the seeds of a
recipe become one line with a band). The per-layer gradient plots select their lines by regular
expression (``LinePlot.metric_regex``) and also list the keys the runs have now.

Offline: building the report and ``write_spec`` / ``load_spec`` make no network call. Two things
in ``wandb_workspaces`` would: a ``Report`` without ``entity`` (its default asks ``wandb.Api()``)
and a ``Runset`` with both ``entity`` and ``project`` (serialising looks the project's id up by
GraphQL). So the report always gets its entity, and the runsets get neither until
``save_online`` publishes a copy.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from train.review.compare import LOSS, Comparison, table
from train.review.page import markdown_table
from train.review.runs import Run
from train.review.verdict import RULE

if TYPE_CHECKING:
    import wandb_workspaces.reports.v2 as wr

__all__ = [
    "RECIPE_KEY",
    "build_report",
    "load_spec",
    "markdown_table",
    "save_online",
    "spec_json",
    "write_spec",
]

#: the runsets' grouping: the recipe name inside the logged run config (``config.config.recipe.name``)
RECIPE_KEY = "config.config.recipe.name"
STEP = "step"  # every lowbit history row carries it (``WandbLogger`` defines it as a metric)
UNDERFLOW = r"^grad/.+/underflow_frac$"
SQNR = r"^grad/.+/sqnr_db$"
_TITLE_MAX = 128  # wandb_workspaces' limit on Report.title


def _all_runs(cmp: Comparison) -> list[Run]:
    runs = [r for row in cmp.rows for r in row.runs] + list(cmp.excluded)
    return list({id(r): r for r in runs}.values())


def _keys(runs: list[Run], pattern: str) -> list[str]:
    rx = re.compile(pattern)
    return sorted({k for r in runs for k in r.series.keys() if rx.match(k)})


def _runset(group: str) -> wr.Runset:
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    if "'" in group or "\\" in group:
        # wandb_workspaces writes the filter as a string expression and parses it again
        raise ValueError(f"logger.wandb.group {group!r}: a W&B report cannot filter on a group with ' or \\")
    return wr.Runset(
        name=f"group {group}", filters=expr.And(expr.Metric("group") == group), groupby=[RECIPE_KEY]
    )


def _line(title: str, y: list[str], *, regex: str | None = None, title_y: str | None = None) -> wr.LinePlot:
    import wandb_workspaces.reports.v2 as wr

    return wr.LinePlot(
        title=title,
        x=STEP,
        y=list[Any](y),
        metric_regex=regex,
        title_x="step",
        title_y=title_y,
        groupby_aggfunc="mean",
        groupby_rangefunc="minmax",
    )


def _panel_sections(runs: list[Run]) -> list[tuple[str, list[Any]]]:
    """(question, panels) per panel grid, in the order the HTML report asks them."""
    import wandb_workspaces.reports.v2 as wr

    return [
        (
            "Training loss: does a recipe train like the reference?",
            [_line("train/loss", [LOSS], title_y="nats")],
        ),
        (
            "Divergence from the reference (runs that trained against one)",
            [
                _line("div/loss_delta", ["div/loss_delta"], title_y="loss - reference loss"),
                _line("div/loss_rel", ["div/loss_rel"], title_y="(loss - reference) / reference"),
            ],
        ),
        (
            "Gradients: underflow and SQNR of the quantized gradients, per layer",
            [
                _line("grad/*/underflow_frac", _keys(runs, UNDERFLOW), regex=UNDERFLOW, title_y="fraction"),
                _line("grad/*/sqnr_db", _keys(runs, SQNR), regex=SQNR, title_y="dB"),
            ],
        ),
        (
            "Throughput and MFU (last logged value, mean over seeds)",
            [
                wr.BarPlot(title="perf/tokens_per_s", metrics=["perf/tokens_per_s"], groupby_aggfunc="mean"),
                wr.BarPlot(
                    title="perf/mfu_bf16_peak", metrics=["perf/mfu_bf16_peak"], groupby_aggfunc="mean"
                ),
                _line("perf/tokens_per_s vs step", ["perf/tokens_per_s"], title_y="tokens/s"),
            ],
        ),
    ]


def _runs_markdown(runs: list[Run]) -> str:
    header = ["run", "recipe", "seed", "state", "last logged step", "link", "note"]
    rows = [
        [r.name, r.recipe, r.seed, r.state, r.series.last_step() or "", r.link, r.excluded or r.reason]
        for r in runs
    ]
    return markdown_table(header, rows)


def build_report(cmp: Comparison, *, entity: str, project: str, group: str, title: str) -> wr.Report:
    """The report of one sweep (W&B group ``group`` in ``entity/project``); builds, no I/O."""
    import wandb_workspaces.reports.v2 as wr

    if not entity or not project:
        raise ValueError("a W&B report needs logger.wandb.entity and logger.wandb.project (set both)")
    runs = _all_runs(cmp)
    header, rows = table(cmp)
    blocks: list[Any] = [
        wr.H1(text=title),
        wr.P(
            text=f"{len(runs)} runs of W&B group {group}; reference recipe {cmp.config.reference}; "
            "written by python -m train.report."
        ),
        wr.H2(text="Summary"),
        wr.MarkdownBlock(text=markdown_table(header, rows)),
        wr.P(text=RULE.format(k=cmp.config.last_k, z=cmp.config.z)),
    ]
    if cmp.excluded:
        blocks.append(wr.H2(text="Refused from the comparison"))
        items = "".join(f"- {r.name}: {r.excluded}\n" for r in cmp.excluded)
        blocks.append(wr.MarkdownBlock(text=items))
    for question, panels in _panel_sections(runs):
        blocks.append(wr.H2(text=question))
        blocks.append(wr.PanelGrid(runsets=[_runset(group)], panels=panels))
    blocks += [wr.H2(text="Runs"), wr.MarkdownBlock(text=_runs_markdown(runs))]
    return wr.Report(
        entity=entity,
        project=project,
        title=title[:_TITLE_MAX],
        description=f"lowbit sweep report, W&B group {group}",
        blocks=blocks,
    )


def spec_json(report: wr.Report) -> str:
    """The report as JSON: the ``ReportViewspec`` model (title, project, and the ``spec`` that
    ``Report.save`` uploads), serialised the way ``wandb_workspaces`` does (aliases, no nulls)."""
    return report._to_model().model_dump_json(by_alias=True, exclude_none=True)


def write_spec(report: wr.Report, path: str | Path) -> Path:
    """Write the report's JSON (``spec_json``) to ``path``; offline."""
    path = Path(path)
    path.write_text(json.dumps(json.loads(spec_json(report)), indent=1) + "\n")
    return path


def load_spec(path: str | Path) -> wr.Report:
    """A ``Report`` back from ``write_spec``'s file, through ``wandb_workspaces``' own model classes."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces.reports.v2 import internal

    model = internal.ReportViewspec.model_validate_json(Path(path).read_text())
    return wr.Report._from_model(model)


def save_online(report: wr.Report, *, timeout_s: float = 5.0) -> str | None:
    """Publish the report and return its URL, only when ``WANDB_API_KEY`` is set and ``WANDB_MODE``
    is not ``offline`` / ``disabled``; else None at once. A server that does not answer within
    ``timeout_s`` (``train.telemetry.loggers.wandb_server_problem``) or a failed save prints why
    and returns None: the files of the report are written already.

    Publishes a copy whose runsets name the report's entity and project (a runset without them
    is what keeps building offline; whether W&B resolves an empty runset project to the report's
    is unverified). UNVERIFIED without a server: the save itself (``Report.save``)."""
    if not os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return None
    from train.telemetry.loggers import wandb_server_problem

    if why := wandb_server_problem(timeout_s):
        print(f"lowbit: W&B report not published: server {why}", flush=True)
        return None
    published = copy.deepcopy(report)
    for block in published.blocks:
        for rs in getattr(block, "runsets", None) or []:
            rs.entity, rs.project = rs.entity or published.entity, rs.project or published.project
    try:
        published.save()
        return str(published.url)
    except Exception as e:  # anything W&B raises (auth, network, GraphQL): the report files stand
        print(f"lowbit: W&B report not published ({type(e).__name__}: {e})", flush=True)
        return None
