r"""Table -> Markdown, booktabs LaTeX (compiles with pdflatex, fits the page) and CSV (raw numbers).

Markdown and LaTeX follow the papers: a group's model and bit-width are written on its first row
only, significantly best values bold, ties marked ≈, FID cells whose ordering an unbiased metric
contradicts marked ‡ (FID∞) or § (KID), arrows in headers, `mean ± std` when several seeds exist (n column) and
`value ± CI half-width` for a single run with a bootstrap CI; the table's title and notes follow it
(Markdown) or form its caption (LaTeX). Every column shares one number of decimals
(`MetricInfo.column_decimals`). LaTeX goes into a paper unchanged: `\small`, a caption and
`\label{tab:<name>}`, and a table wider than a page column is scaled to `\linewidth`.
"""

from __future__ import annotations

import html
import io
import re

import pandas as pd

from harness.aggregate.metric_info import MetricInfo
from harness.aggregate.table import FLAG_NAMES, Cell, Table

MISSING_MD = "–"
MISSING_TEX = "--"
_TEX_SPECIAL = re.compile(r"([&%$#_{}])|(\\)|(~)|(\^)")
_TEX_ARROW = {"↑": r"$\uparrow$", "↓": r"$\downarrow$", "": ""}
# Unicode the notes and headers use, as LaTeX (pdflatex's default input has none of it)
_TEX_UNICODE = {"±": r"$\pm$", "≈": r"$\approx$", "‡": r"$^\ddagger$", "§": r"$^\S$", "∞": r"$_\infty$",
                "×": r"$\times$", "²": r"$^2$", "³": r"$^3$", "⁶": r"$^6$", "≥": r"$\geq$", "–": "--"}
TEX_PACKAGES = r"\usepackage{booktabs,graphicx}"
# \small characters per line of a one-column article page, counting a column's padding as 2.5
# characters: wider tables are scaled down to \linewidth.
PAGE_CHARS = 66
COLUMN_PAD = 2.5


# per format: the tie mark, then the mark of each unbiased metric that orders a FID cell differently
MARKS = {"md": (" ≈", {k: f" {mark}" for k, (mark, _) in FLAG_NAMES.items()}),
         "tex": (r"$\approx$", {k: _TEX_UNICODE[mark] for k, (mark, _) in FLAG_NAMES.items()})}


def column_decimals(table: Table) -> list[int]:
    """One decimal count per metric column, from every value shown in it."""
    return [info.column_decimals(r.cells[j].mean for r in table.rows) for j, info in enumerate(table.metrics)]


def cell_text(cell: Cell, info: MetricInfo, pm: str, decimals: int) -> str:
    """`value`, `mean±std` (seeds) or `value±CI half-width` (one run), all with `decimals`."""
    text = info.format(cell.mean, decimals)
    if cell.std is not None:
        return f"{text}{pm}{info.format(cell.std, decimals)}"
    if cell.ci is not None:
        return f"{text}{pm}{info.format((cell.ci[1] - cell.ci[0]) / 2, decimals)}"
    return text


def _marked(text: str, cell: Cell, fmt: str) -> str:
    tie, flags = MARKS[fmt]
    return text + (tie if cell.tie else "") + "".join(flags[k] for k in cell.flags)


def shown_groups(table: Table) -> list[tuple[str, ...]]:
    """Group values with repeats blanked (a value is written where it changes)."""
    shown, prev = [], ()
    for row in table.rows:
        same = 0
        while same < len(row.group) and prev[same:same + 1] == (row.group[same],):
            same += 1
        shown.append(("",) * same + row.group[same:])
        prev = row.group
    return shown


def header(table: Table) -> list[str]:
    return [*table.group_cols, *table.label_cols, *(["n"] if table.show_n else []),
            *(f"{m.display}{m.arrow}" for m in table.metrics)]


def text_rows(table: Table, pm: str = " ± ", missing: str = MISSING_MD) -> list[tuple[list[str], list[Cell]]]:
    """Each row's shown text (group, label, n, formatted metric cells, no marks) with its cells."""
    decimals = column_decimals(table)
    out = []
    for row, group in zip(table.rows, shown_groups(table), strict=True):
        cells = [missing if c.mean is None else cell_text(c, info, pm, d)
                 for c, info, d in zip(row.cells, table.metrics, decimals, strict=True)]
        out.append(([*group, *row.label, *([str(row.n)] if table.show_n else []), *cells], list(row.cells)))
    return out


def to_markdown(table: Table) -> str:
    head = header(table)
    align = ["---"] * (len(head) - len(table.metrics)) + ["---:"] * len(table.metrics)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    n_text = len(head) - len(table.metrics)
    for texts, cells in text_rows(table):
        shown = [_marked(f"**{t}**" if c.bold else t, c, "md") for t, c in zip(texts[n_text:], cells, strict=True)]
        lines.append("| " + " | ".join([*(v.replace("|", "\\|") for v in texts[:n_text]), *shown]) + " |")
    title = f"{table.title}.\n\n" if table.title else ""
    return title + "\n".join(lines) + "\n" + "".join(f"\n{note}\n" for note in table.notes)


def tex_escape(text: str) -> str:
    def sub(m: re.Match[str]) -> str:
        if m[1]:
            return "\\" + m[1]
        return {"\\": r"\textbackslash{}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}[m[0]]

    return _TEX_SPECIAL.sub(sub, text)


def tex_text(text: str) -> str:
    """Prose or a header for LaTeX: escaped, its Unicode symbols as math; text already inside $...$ is kept."""
    pieces = text.split("$")
    out = []
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            piece = tex_escape(piece)
            for char, tex in _TEX_UNICODE.items():
                piece = piece.replace(char, tex)
        out.append(piece)
    return "$".join(out)


def _too_wide(texts: list[list[str]]) -> bool:
    """Whether the tabular would overflow a page column at \\small (the widest text of each column,
    as printed: one character per symbol)."""
    widths = [max(len(row[j]) for row in texts) for j in range(len(texts[0]))]
    return sum(widths) + COLUMN_PAD * len(widths) > PAGE_CHARS


def to_latex(table: Table, caption: str | None = None, standalone: bool = False, label: str | None = None) -> str:
    """A booktabs tabular in a table float with caption (`caption` or the table's title, then its notes:
    what ± and n and the marks mean) and `\\label{tab:<name>}`; `standalone` adds a preamble."""
    title = caption if caption is not None else table.title
    caption = " ".join(t for t in (title and tex_text(title.rstrip(".") + "."), tex_text(" ".join(table.notes))) if t)
    n_cols = len(table.group_cols) + len(table.label_cols) + int(table.show_n)
    head = [*map(tex_escape, (*table.group_cols, *table.label_cols)), *(["$n$"] if table.show_n else []),
            *(tex_text(m.display) + _TEX_ARROW[m.arrow] for m in table.metrics)]
    rows = text_rows(table, r"$\pm$", MISSING_TEX)
    wide = _too_wide([header(table), *(t for t, _ in text_rows(table, "±"))])
    body = []
    prev: tuple[str, ...] | None = None
    for row, (texts, cells) in zip(table.rows, rows, strict=True):
        if prev is not None and row.group != prev:
            top_changed = row.group[:1] != prev[:1]
            body.append(r"\midrule" if top_changed else rf"\cmidrule(l){{2-{n_cols + len(table.metrics)}}}")
        shown = [_marked(rf"\textbf{{{t}}}" if c.bold else t, c, "tex") for t, c in zip(texts[n_cols:], cells,
                                                                                      strict=True)]
        body.append(" & ".join([*map(tex_escape, texts[:n_cols - int(table.show_n)]),
                                *texts[n_cols - int(table.show_n):n_cols], *shown]) + r" \\")
        prev = row.group
    tabular = [r"\begin{tabular}{" + "l" * n_cols + "r" * len(table.metrics) + "}",
               r"\toprule", " & ".join(head) + r" \\", r"\midrule", *body, r"\bottomrule", r"\end{tabular}"]
    if wide:
        tabular = [r"\resizebox{\linewidth}{!}{%", *tabular, "}"]
    lines = [
        f"% needs {TEX_PACKAGES}",
        r"\begin{table}[t]", r"\centering", r"\small",
        *([rf"\caption{{{caption}}}"] if caption else []),
        rf"\label{{{label or 'tab:' + table.name}}}",
        *tabular, r"\end{table}",
    ]
    text = "\n".join(lines) + "\n"
    if standalone:
        text = f"\\documentclass{{article}}\n{TEX_PACKAGES}\n\\begin{{document}}\n" + text + "\\end{document}\n"
    return text


def to_html(table: Table) -> str:
    """A <table> for the HTML report: the same cells, decimals and marks as the Markdown, the title and
    notes as its caption (escaped; no script, no style)."""
    n_text = len(header(table)) - len(table.metrics)
    head = "".join(f'<th{" class=num" if i >= n_text else ""}>{html.escape(h)}</th>'
                   for i, h in enumerate(header(table)))
    body = []
    for texts, cells in text_rows(table):
        tds = [f"<td>{html.escape(t)}</td>" for t in texts[:n_text]]
        for text, cell in zip(texts[n_text:], cells, strict=True):
            shown = _marked(f"<b>{html.escape(text)}</b>" if cell.bold else html.escape(text), cell, "md")
            tds.append(f'<td class="num">{shown}</td>')
        body.append(f"<tr>{''.join(tds)}</tr>")
    notes = "".join(f"<p>{html.escape(n)}</p>" for n in table.notes)
    caption = f"<caption><strong>{html.escape(table.title)}</strong>{notes}</caption>" if table.title or notes else ""
    return (f'<table class="results" id="table-{html.escape(table.name)}">{caption}<thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


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
