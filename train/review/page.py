"""The report's files: ``index.html`` (no script, no network: plots are PNG files beside it,
linked by relative path), ``summary.csv``, ``summary.md``, and the terminal table.

The HTML, CSV, Markdown and terminal tables are one table (``train.review.compare.table``).
"""

from __future__ import annotations

import csv
import html
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from train.review.compare import Comparison, table
from train.review.runs import Run
from train.review.verdict import RULE

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.v-worse, td.v-diverged, td.v-failed { background: #fde2e2; }
td.v-better { background: #e2f5e2; }
td.v-indistinguishable, td.v-reference { background: #eef3fb; }
img { max-width: 100%; border: 1px solid #ddd; }
.rule, .note { color: #555; font-size: 0.9em; }
"""


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _link(run: Run, out_dir: Path) -> str:
    if run.url:
        return f'<a href="{html.escape(run.url)}">{html.escape(run.name)}</a>'
    if run.path:
        rel = os.path.relpath(run.path.resolve(), out_dir.resolve())
        return f'<a href="{html.escape(rel)}/">{html.escape(run.name)}</a>'
    return html.escape(run.name)


def _summary_html(cmp: Comparison, out_dir: Path) -> str:
    header, rows = table(cmp)
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for row, rec in zip(rows, cmp.rows):
        cells = []
        for h, v in zip(header, row):
            if h == "runs":
                cells.append(
                    "<td>" + " ".join(f"{_link(r, out_dir)} ({r.state})" for r in rec.runs) + "</td>"
                )
            elif h == "verdict":
                cells.append(f'<td class="v-{rec.verdict.kind}">{html.escape(str(v))}</td>')
            else:
                cells.append(f"<td>{html.escape(str(v))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def _runs_html(runs: list[Run], out_dir: Path) -> str:
    out = ["<table><tr><th>run</th><th>recipe</th><th>seed</th><th>state</th><th>last logged step</th>"
           "<th>backend</th><th>note</th></tr>"]  # fmt: skip
    for r in runs:
        note = r.excluded or r.reason
        out.append(
            f"<tr><td>{_link(r, out_dir)}</td><td>{html.escape(r.recipe)}</td><td>{r.seed}</td>"
            f"<td>{html.escape(r.state)}</td><td>{r.series.last_step() or ''}</td>"
            f"<td>{html.escape(r.backend)}</td><td>{html.escape(note)}</td></tr>"
        )
    return "\n".join(out) + "</table>"


def write_page(out_dir: Path, cmp: Comparison, runs: list[Run], plots: list[Any], *, title: str,
               extras: Sequence[tuple[str, str, str]] = ()) -> Path:  # fmt: skip
    """``index.html`` with the summary table, every plot (``plots``: objects with ``name`` and
    ``question``, saved as ``<name>.png`` in ``out_dir``), the ablation tools' answers (``extras``:
    ``(id, question, html)``, ``train.review.ablations``) and every run with its state."""
    rule = RULE.format(k=cmp.config.last_k, z=cmp.config.z)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='note'>{len(runs)} runs; reference recipe <b>{html.escape(cmp.config.reference)}</b>; "
        f"written {time.strftime('%Y-%m-%d %H:%M:%S')} by <code>python -m train.report</code>. "
        "Also as <a href='summary.csv'>CSV</a> and <a href='summary.md'>Markdown</a>.</p>",
        "<h2>Summary</h2>",
        _summary_html(cmp, out_dir),
        f"<p class='rule'>{html.escape(rule)}</p>",
    ]
    if cmp.excluded:
        parts.append("<h2>Refused from the comparison</h2><ul>")
        parts += [f"<li>{_link(r, out_dir)}: {html.escape(r.excluded)}</li>" for r in cmp.excluded]
        parts.append("</ul>")
    for p in plots:
        parts.append(f"<h2 id='{p.name}'>{html.escape(p.question)}</h2>")
        parts.append(f"<img src='{p.name}.png' alt='{html.escape(p.question)}'>")
    for sid, question, body in extras:
        parts += [f"<h2 id='{sid}'>{html.escape(question)}</h2>", body]
    parts += ["<h2>Runs</h2>", _runs_html(runs, out_dir), "</body></html>"]
    path = out_dir / "index.html"
    path.write_text("\n".join(parts) + "\n")
    return path


def write_tables(out_dir: Path, cmp: Comparison) -> tuple[Path, Path]:
    header, rows = table(cmp)
    csv_path, md_path = out_dir / "summary.csv", out_dir / "summary.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    rule = RULE.format(k=cmp.config.last_k, z=cmp.config.z)
    md_path.write_text(markdown_table(header, rows) + "\n" + rule + "\n")
    return csv_path, md_path


def print_table(cmp: Comparison, *, title: str, console: Any = None) -> None:
    """The summary table in the terminal (rich), the columns a reviewer reads first."""
    from rich.console import Console
    from rich.table import Table

    header, rows = table(cmp)
    wanted = {"recipe": "recipe", "backend": "backend", "seeds": "seeds", "final loss": "loss",
              "delta vs reference (+- SE)": "delta +- SE", "verdict": "verdict",
              "divergence step": "div. step", "tokens/s": "tokens/s", "speedup vs reference": "speedup"}  # fmt: skip
    idx = [header.index(h) for h in wanted]
    t = Table(title=title)
    for short in wanted.values():
        t.add_column(short, no_wrap=short in ("recipe", "verdict", "delta +- SE"))
    for row in rows:
        t.add_row(*(str(row[i]) for i in idx))
    (console or Console(width=None if sys.stdout.isatty() else 160)).print(t)
