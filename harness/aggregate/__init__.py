"""Results store -> paper-style tables (LaTeX booktabs, Markdown, CSV, HTML, console) and figures.

Pipeline: store records -> `frame.records_frame` (finished runs, tidy DataFrame) ->
`table.make_table` (a pure `Table`: groups, rows, significance marks, mean/std/n, title and caption
notes) -> `render` (text) or `console` (the terminal); `plots` draws the figures in the look of
`style` (one colour per method, panel grid, PNG + PDF). `harness.report` puts them all on one page.
To add a metric's arrow/format/meaning, register a `MetricInfo` in metric_info.py; to add a table
kind, add its (group_by, row_by) to `table.LAYOUTS`, its record selection to `table.select_records`
and its title to `table.TITLES`.
"""
