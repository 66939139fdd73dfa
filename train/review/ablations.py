"""The ablation tools' answers as sections of the sweep report.

``python -m train.report DIR`` on the ``--out`` directory of ``python -m train.attribute`` or
``python -m train.sensitivity`` compares the member runs like any sweep and, beside them, shows
the tool's own answer: the Shapley shares of the three GEMMs (``attribution.md`` and its plot), or
which layers stay in BF16 with the evidence table (``sensitivity.md``). Nothing is recomputed
here: the section is the tool's Markdown, rendered.
"""

from __future__ import annotations

import html
import re
import shutil
from pathlib import Path

#: file the tool writes -> (section id, the question it answers)
ANSWERS = {
    "attribution.md": ("attribution", "Which GEMM does the loss gap come from? (train.attribute)"),
    "sensitivity.md": ("sensitivity", "Which layers must stay in BF16? (train.sensitivity)"),
}


def _inline(text: str) -> str:
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def markdown_html(md: str) -> str:
    """The subset of Markdown the tools write: headings, paragraphs, pipe tables, indented code."""
    parts: list[str] = []
    table: list[list[str]] = []

    def flush() -> None:
        if table:
            head, *body = table
            rows = [f"<tr>{''.join(f'<th>{_inline(c)}</th>' for c in head)}</tr>"]
            rows += [f"<tr>{''.join(f'<td>{_inline(c)}</td>' for c in r)}</tr>" for r in body]
            parts.append("<table>" + "".join(rows) + "</table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                table.append(cells)
            continue
        flush()
        if line.startswith("#"):
            continue  # the section has its own heading
        if line.startswith("    "):
            parts.append(f"<pre>{html.escape(line.strip())}</pre>")
        elif line.strip():
            parts.append(f"<p>{_inline(line)}</p>")
    flush()
    return "\n".join(parts)


def sections(paths: list[Path], out_dir: Path) -> list[tuple[str, str, str]]:
    """``(id, question, html)`` for each tool answer found in ``paths``; a plot beside it
    (``attribution.png``) is copied into ``out_dir`` and shown."""
    found = []
    for i, path in enumerate(paths):
        for name, (sid, question) in ANSWERS.items():
            md = path / name
            if not md.is_file():
                continue
            body = markdown_html(md.read_text())
            png = md.with_suffix(".png")
            if png.is_file():
                target = f"{sid}{i or ''}.png"
                shutil.copyfile(png, out_dir / target)
                body = f"<img src='{target}' alt='{html.escape(question)}'>\n{body}"
            found.append((f"{sid}{i or ''}", question, body))
    return found
