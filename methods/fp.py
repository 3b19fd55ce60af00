"""The unquantized model: the reference row of every table."""

from __future__ import annotations

from harness.calibration import CalibData
from harness.models.base import DiffusionModel
from methods.base import METHODS, Method, MethodReport
from methods.engine.modules import QuantSpec
from methods.settings import MethodSettings


@METHODS.register("fp")
class FullPrecision(Method):
    """Leaves the network as it is; calibration data is not used."""

    name = "fp"
    Settings = MethodSettings

    def quantize_net(self, model: DiffusionModel, calib: CalibData, spec: QuantSpec) -> MethodReport:
        return MethodReport(keep_fp=["*"], details={"note": "full precision, nothing quantized"})
