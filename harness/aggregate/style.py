"""The look of every figure, in one place: one colour per method (the same in every panel, figure and
the HTML report), panel grid and file formats.

Colours are the Okabe-Ito palette (distinguishable with the common colour-vision deficiencies),
assigned by method key, not by plotting order, so a method keeps its colour whatever else is shown.
"""

from __future__ import annotations

import math

# method key -> colour; FP is the black reference
METHOD_COLORS = {"fp": "#000000", "rtn": "#999999", "ptq4dm": "#E69F00", "qdiff": "#0072B2", "tfmq": "#D55E00",
                 "rtn+cache": "#CC79A7"}
# methods outside the table above, in order of first use
SPARE_COLORS = ("#009E73", "#56B4E9", "#F0E442", "#882255", "#44AA99")
MAX_COLS = 3  # panels per row before the grid wraps
PANEL_SIZE = (4.0, 3.0)  # inches per panel
DPI = 200  # PNG resolution; the PDF is vector
FORMATS = ("png", "pdf")
BAND_ALPHA = 0.2  # seed band opacity


_SPARE_USED: dict[str, str] = {}


def method_color(method: str) -> str:
    """The fixed colour of a method key (e.g. `tfmq`), a spare one (stable per process) otherwise."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    if method not in _SPARE_USED:
        _SPARE_USED[method] = SPARE_COLORS[len(_SPARE_USED) % len(SPARE_COLORS)]
    return _SPARE_USED[method]


def grid_shape(panels: int) -> tuple[int, int]:
    """(rows, cols) of a panel grid that wraps after MAX_COLS columns."""
    cols = min(MAX_COLS, max(1, panels))
    return math.ceil(max(1, panels) / cols), cols
