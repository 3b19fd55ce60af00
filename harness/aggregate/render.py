"""Table -> Markdown, booktabs LaTeX (compiles with pdflatex) and CSV (raw numbers, for reuse).

Markdown and LaTeX follow the papers: a group's model and bit-width are written on its first row
only, significantly best values bold, ties marked ≈, FID cells whose ordering an unbiased metric
contradicts marked ‡, arrows in headers, `mean ± std` when several seeds exist (n column) and
`value ± CI half-width` for a single run with a bootstrap CI; the table's notes follow it (Markdown)
or form its caption (LaTeX).
"""

from __future__ import annotations

import io
import re

import pandas as pd

from harness.aggregate.metric_info import MetricInfo
from harness.aggregate.table import Cell, Table

MISSING_MD = "–"
MISSING_TEX = "--"
_TEX_SPECIAL = re.compile(r"([&%$#_{}])|(\\)|(~)|(\^)")
_TEX_ARROW = {"↑": r"$\uparrow$", "↓": r"$\downarrow$", "": ""}


MARKS = {"md": (" ≈", " ‡"), "tex": (r"$\approx$", r"$^\ddagger$")}


def _cell_text(cell: Cell, info: MetricInfo, pm: str) -> str:
    text = info.format(cell.mean)
    if cell.std is not None:
        return f"{text}{pm}{info.format_std(cell.mean, cell.std)}"
    if cell.ci is not None:
        return f"{text}{pm}{info.format_std(cell.mean, (cell.ci[1] - cell.ci[0]) / 2)}"
    return text


def _marked(text: str, cell: Cell, fmt: str) -> str:
    tie, flag = MARKS[fmt]
    return text + (tie if cell.tie else "") + (flag if cell.flag else "")


def _shown_groups(table: Table) -> list[tuple[str, ...]]:
    """Group values with repeats blanked (a value is written where it changes)."""
    shown, prev = [], ()
    for row in table.rows:
        same = 0
        while same < len(row.group) and prev[same:same + 1] == (row.group[same],):
            same += 1
        shown.append(("",) * same + row.group[same:])
        prev = row.group
    return shown


def to_markdown(table: Table) -> str:
    head = [*table.group_cols, *table.label_cols, *(["n"] if table.show_n else []),
            *(f"{m.display}{m.arrow}" for m in table.metrics)]
    align = ["---"] * (len(head) - len(table.metrics)) + ["---:"] * len(table.metrics)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for row, group in zip(table.rows, _shown_groups(table), strict=True):
        cells = []
        for cell, info in zip(row.cells, table.metrics, strict=True):
            text = MISSING_MD if cell.mean is None else _cell_text(cell, info, " ± ")
            cells.append(_marked(f"**{text}**" if cell.bold else text, cell, "md"))
        n = [str(row.n)] if table.show_n else []
        text = [v.replace("|", "\\|") for v in (*group, *row.label)]
        lines.append("| " + " | ".join([*text, *n, *cells]) + " |")
    return "\n".join(lines) + "\n" + "".join(f"\n{note}\n" for note in table.notes)


def tex_escape(text: str) -> str:
    def sub(m: re.Match[str]) -> str:
        if m[1]:
            return "\\" + m[1]
        return {"\\": r"\textbackslash{}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}[m[0]]

    return _TEX_SPECIAL.sub(sub, text)


def _tex_text(text: str) -> str:
    """Escape prose that already holds math ($...$) for LaTeX: only the text outside $...$ is escaped."""
    pieces = text.split("$")
    return "$".join(p if i % 2 else tex_escape(p).replace("±", r"$\pm$") for i, p in enumerate(pieces))


def to_latex(table: Table, caption: str | None = None, standalone: bool = False) -> str:
    """A booktabs tabular (wrapped in a table float with caption); `standalone` adds a preamble.

    The table's notes (what ± and the marks mean) are appended to the caption."""
    notes = " ".join(table.notes).replace("≈", "$\\approx$").replace("‡", "$\\ddagger$").replace("∞", "$_\\infty$")
    caption = ". ".join(t for t in (caption and tex_escape(caption).rstrip("."), notes and _tex_text(notes)) if t)
    n_cols = len(table.group_cols) + len(table.label_cols) + int(table.show_n)
    head = [*table.group_cols, *table.label_cols, *(["$n$"] if table.show_n else []),
            *(tex_escape(m.display).replace("∞", r"$_\infty$") + _TEX_ARROW[m.arrow] for m in table.metrics)]
    body = []
    prev: tuple[str, ...] | None = None
    for row, group in zip(table.rows, _shown_groups(table), strict=True):
        if prev is not None and row.group != prev:
            top_changed = row.group[:1] != prev[:1]
            body.append(r"\midrule" if top_changed else rf"\cmidrule(l){{2-{n_cols + len(table.metrics)}}}")
        cells = []
        for cell, info in zip(row.cells, table.metrics, strict=True):
            text = MISSING_TEX if cell.mean is None else _cell_text(cell, info, r"$\pm$")
            cells.append(_marked(rf"\textbf{{{text}}}" if cell.bold else text, cell, "tex"))
        n = [str(row.n)] if table.show_n else []
        body.append(" & ".join([*map(tex_escape, group), *map(tex_escape, row.label), *n, *cells]) + r" \\")
        prev = row.group
    lines = [
        r"\begin{table}[t]", r"\centering",
        *([rf"\caption{{{caption}}}"] if caption else []),
        r"\begin{tabular}{" + "l" * n_cols + "r" * len(table.metrics) + "}",
        r"\toprule", " & ".join(head) + r" \\", r"\midrule", *body, r"\bottomrule",
        r"\end{tabular}", r"\end{table}",
    ]
    text = "\n".join(lines) + "\n"
    if standalone:
        text = "\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n" + text + "\\end{document}\n"
    return text


def to_csv(table: Table) -> str:
    """One line per row with every group/label value, n, and each metric's mean, std, bootstrap CI (single
    runs) and mark (best / tie / empty) in raw units."""
    records = []
    for row in table.rows:
        rec: dict[str, object] = dict(zip(table.group_cols, row.group, strict=True))
        rec.update(zip(table.label_cols, row.label, strict=True))
        rec["n"] = row.n
        for cell, info in zip(row.cells, table.metrics, strict=True):
            rec[info.key] = cell.mean
            rec[f"{info.key}_std"] = cell.std
            rec[f"{info.key}_ci_lo"], rec[f"{info.key}_ci_hi"] = cell.ci or (None, None)
            rec[f"{info.key}_mark"] = "best" if cell.bold else "tie" if cell.tie else ""
        records.append(rec)
    columns = [*table.group_cols, *table.label_cols, "n",
               *(c for m in table.metrics for c in (m.key, f"{m.key}_std", f"{m.key}_ci_lo", f"{m.key}_ci_hi",
                                                    f"{m.key}_mark"))]
    buf = io.StringIO()
    pd.DataFrame(records, columns=columns).to_csv(buf, index=False, lineterminator="\n", float_format="%.10g")
    return buf.getvalue()


RENDERERS = {"md": (to_markdown, "md"), "latex": (to_latex, "tex"), "csv": (to_csv, "csv")}
