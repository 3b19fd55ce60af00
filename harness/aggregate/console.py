"""A table on the terminal, where a sweep ends: rich when installed, else the Markdown text.

The cells, decimals and marks are render.py's (the same as in quality.md); bold stays bold. Without a
terminal (a log file, CI) rich is given a wide fixed width, so columns are not wrapped into debris.
"""

from __future__ import annotations

import shutil
import sys
from typing import TextIO

from harness.aggregate.render import MARKS, header, text_rows, to_markdown
from harness.aggregate.table import Table

LOG_WIDTH = 200  # characters per line when stdout is not a terminal


def print_table(table: Table, file: TextIO | None = None) -> None:
    out = file or sys.stdout
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table as RichTable
    except ImportError:
        print(to_markdown(table), file=out, flush=True)
        return
    width = shutil.get_terminal_size((LOG_WIDTH, 24)).columns if out.isatty() else LOG_WIDTH
    console = Console(file=out, width=width, highlight=False, soft_wrap=False)
    shown = RichTable(title=escape(table.title) or None, title_justify="left", show_edge=False, header_style="bold")
    heads = header(table)
    n_text = len(heads) - len(table.metrics)
    for i, head in enumerate(heads):
        shown.add_column(head, justify="right" if i >= n_text else "left", no_wrap=True)
    tie, flags = MARKS["md"]
    # a log keeps no styles: there, significant bests are written **bold** as in Markdown
    strong = "[bold]{}[/bold]" if console.is_terminal else "**{}**"
    for texts, cells in text_rows(table):
        marked = [(strong.format(escape(t)) if c.bold else escape(t)) + (tie if c.tie else "")
                  + "".join(flags[k] for k in c.flags) for t, c in zip(texts[n_text:], cells, strict=True)]
        shown.add_row(*map(escape, texts[:n_text]), *marked)
    console.print(shown)
    for note in table.notes:
        console.print(note, style="dim", markup=False)
