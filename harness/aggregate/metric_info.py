"""Metric metadata for tables: display name, direction (the header arrow, which value is bold), format.

A metric the registry does not know is still tabulated, under its key, without arrow or bold.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.registry import Registry


@dataclass(frozen=True)
class MetricInfo:
    key: str
    display: str
    higher_is_better: bool | None  # None: no arrow, never bold
    fmt: str = ".2f"
    scale: float = 1.0  # shown value = stored value * scale (bytes -> MB)

    def format(self, value: float) -> str:
        return format(value * self.scale, self.fmt)

    def format_std(self, mean: float, std: float) -> str:
        """The std with as many decimals as the shown mean, so `0.2500 ± 0.0177` lines up."""
        shown = self.format(mean)
        decimals = len(shown.split(".")[1]) if "." in shown and "e" not in shown else 0
        return format(std * self.scale, f".{decimals}f")

    @property
    def arrow(self) -> str:
        return {True: "↑", False: "↓", None: ""}[self.higher_is_better]


METRIC_INFO: Registry[MetricInfo] = Registry("metric")

for _info in (
    MetricInfo("fid", "FID", False),
    MetricInfo("fid_inf", "FID∞", False),  # FID extrapolated to infinitely many samples (unbiased)
    MetricInfo("sfid", "sFID", False),
    MetricInfo("is", "IS", True),
    MetricInfo("kid", "KID", False, ".4f"),
    MetricInfo("psnr_vs_fp", "PSNR vs FP (dB)", True),
    MetricInfo("class_accuracy", "class acc.", True, ".3f"),
    MetricInfo("adaround_soft_fraction", "undecided rounding", None, ".4f"),
    MetricInfo("tfe", "TFE", False, "#.4g"),
    MetricInfo("traj", "TrajE", False, "#.4g"),
    MetricInfo("calib_seconds", "calib time (s)", False, ".1f"),
    MetricInfo("latency_ms", "latency (ms)", False),
    MetricInfo("latency_per_image_ms", "latency/img (ms)", False),
    MetricInfo("weight_bytes", "weight MB", False, ".2f", 1e-6),
):
    METRIC_INFO.register(_info.key)(_info)

# Mean over timesteps of a record's per-timestep curve, when the run did not store the scalar.
DERIVED_FROM_CURVES = {"tfe": "temporal_feature_error", "traj": "trajectory_error"}

DEFAULT_METRICS = {
    "quality": ("fid", "fid_inf", "sfid", "is", "kid", "psnr_vs_fp", "tfe", "calib_seconds"),
    "ablation": ("fid", "sfid", "is", "tfe"),
    "latency": ("latency_ms", "latency_per_image_ms", "weight_bytes"),
}


def metric_info(key: str) -> MetricInfo:
    return METRIC_INFO.get(key) if key in METRIC_INFO else MetricInfo(key, key, None, "#.4g")
