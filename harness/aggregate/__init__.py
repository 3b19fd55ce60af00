"""Results store -> paper-style tables (LaTeX booktabs, Markdown, CSV) and the per-timestep TFE plot.

Pipeline: store records -> `frame.records_frame` (finished runs, tidy DataFrame) ->
`table.make_table` (a pure `Table`: groups, rows, bold best, mean/std/n) -> `render` (text).
To add a metric's arrow/format, register a `MetricInfo` in metric_info.py; to add a table kind,
add its (group_by, row_by) to `table.LAYOUTS` and its record selection to `table.select_records`.
"""
