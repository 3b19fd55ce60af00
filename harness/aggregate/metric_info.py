"""Metric metadata for tables: display name, direction (the header arrow, which value is bold), format.

A metric the registry does not know is still tabulated, under its key, without arrow or bold.
Number formats are chosen per metric, once, so every table and the report print a metric alike:
metrics with a natural unit keep fixed decimals (FID .2f, seconds .1f); scale-free ones (KID, TFE)
get SIG significant figures on the largest value of the column, the same decimals down the column,
so the FP row's 1e-7 prints 0.0000 beside 0.0392 instead of switching to exponent notation.
Per-batch latency keys (`latency_ms_b64`, `ms_per_image_b64`) are named with their batch size.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from harness.registry import Registry

SIG = 3  # significant figures of a scale-free metric's largest value in a column


@dataclass(frozen=True)
class MetricInfo:
    key: str
    display: str
    higher_is_better: bool | None  # None: no arrow, never bold
    decimals: int | None = 2  # None: SIG significant figures on the column's largest value
    scale: float = 1.0  # shown value = stored value * scale (bytes -> MB)
    meaning: str = ""  # one sentence for table captions and the README, "" when the name says it

    def column_decimals(self, values: Iterable[float | None]) -> int:
        """Decimals shared by every value of one column (and by its ± part)."""
        if self.decimals is not None:
            return self.decimals
        top = max((abs(v * self.scale) for v in values if v is not None and math.isfinite(v) and v != 0), default=0.0)
        return SIG - 1 if top == 0 else max(0, SIG - 1 - math.floor(math.log10(top)))

    def format(self, value: float, decimals: int | None = None) -> str:
        places = self.column_decimals([value]) if decimals is None else decimals
        return f"{value * self.scale:.{places}f}"

    @property
    def arrow(self) -> str:
        return {True: "↑", False: "↓", None: ""}[self.higher_is_better]


METRIC_INFO: Registry[MetricInfo] = Registry("metric")

for _info in (
    MetricInfo("fid", "FID", False),
    MetricInfo("fid_inf", "FID∞", False, meaning="FID∞: FID extrapolated to infinitely many samples (unbiased)."),
    MetricInfo("sfid", "sFID", False,
               meaning="sFID: FID on spatial (intermediate conv) features, sensitive to layout."),
    MetricInfo("is", "IS", True),
    MetricInfo("kid", "KID", False, None,
               meaning="KID: unscaled (the kernel MMD² itself, not ×10³), on the same features as FID."),
    MetricInfo("psnr_vs_fp", "PSNR vs FP (dB)", True,
               meaning="PSNR vs FP: per-image PSNR of each sample against the FP sample from the same noise."),
    MetricInfo("class_accuracy", "class acc.", True, 3),
    MetricInfo("adaround_soft_fraction", "undecided rounding", None, 4),
    MetricInfo("tfe", "TFE", False, None,
               meaning="TFE: relative L2 error of the temporal features vs FP, mean over blocks and timesteps."),
    MetricInfo("traj", "TrajE", False, None, meaning="TrajE: trajectory error vs FP, mean over timesteps."),
    MetricInfo("calib_seconds", "calib time (s)", False, 1,
               meaning="calib time: wall-clock seconds of calibration and reconstruction on the machine that ran it."),
    MetricInfo("latency_ms", "latency (ms)", False),
    MetricInfo("latency_per_image_ms", "latency/img (ms)", False),
    MetricInfo("weight_bytes", "weight MB", False, 2, 1e-6, meaning="weight MB: packed weight memory (10⁶ bytes)."),
):
    METRIC_INFO.register(_info.key)(_info)

# Mean over timesteps of a record's per-timestep curve, when the run did not store the scalar.
DERIVED_FROM_CURVES = {"tfe": "temporal_feature_error", "traj": "trajectory_error"}

# `<min>` / `<max>`: the smallest / largest batch size the records measured (see table.choose_metrics).
DEFAULT_METRICS = {
    "quality": ("fid", "fid_inf", "sfid", "is", "kid", "psnr_vs_fp", "tfe", "calib_seconds"),
    "ablation": ("fid", "sfid", "is", "tfe"),
    "latency": ("latency_ms_b<min>", "ms_per_image_b<max>", "weight_bytes"),
}
_BATCH_KEYS = {
    re.compile(r"latency_ms_b(\d+)"): ("ms/call, batch {b}", "median wall time of one denoiser call"),
    re.compile(r"ms_per_image_b(\d+)"): ("ms/image, batch {b}", "the call's time divided by the batch size"),
}

# The feature extractor behind FID, sFID, IS and KID: its name in headers and captions.
EXTRACTOR_NAMES = {"lenet": "LeNet", "inception": "Inception"}
EXTRACTOR_METRICS = ("fid", "fid_inf", "sfid")  # headers that carry the extractor name (LeNet-FID)


def metric_info(key: str) -> MetricInfo:
    if key in METRIC_INFO:
        return METRIC_INFO.get(key)
    for pattern, (display, meaning) in _BATCH_KEYS.items():
        if m := pattern.fullmatch(key):
            name = display.format(b=m[1])
            return MetricInfo(key, name, False, meaning=f"{name}: {meaning} (ms).")
    return MetricInfo(key, key, None, None)


def with_extractor(info: MetricInfo, extractor: str) -> MetricInfo:
    """`FID` -> `LeNet-FID` where every row of a table used LeNet features; Inception keeps `FID`,
    the name papers use for it."""
    if info.key not in EXTRACTOR_METRICS or extractor != "lenet":
        return info
    return MetricInfo(info.key, f"{EXTRACTOR_NAMES[extractor]}-{info.display}", info.higher_is_better,
                      info.decimals, info.scale, info.meaning)
