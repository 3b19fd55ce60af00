"""The fake backend: the method's simulated-quantization network, executed as is (the reference).

Weights are the frozen dequantized values and activations are quantized and dequantized in fp32, so
the numbers are those of an integer kernel up to float rounding, on any device, with no speed-up.
"""

from __future__ import annotations

from typing import Any

from harness.backends.base import BACKENDS, Backend, device_name, net_device
from harness.models.base import DiffusionModel
from methods.engine.modules import QuantSpec, quant_layers


@BACKENDS.register("fake")
class FakeBackend(Backend):
    """Identity: returns the quantized model unchanged."""

    name = "fake"
    defaults: dict[str, Any] = {}

    def prepare(self, qmodel: DiffusionModel, spec: QuantSpec | None) -> DiffusionModel:
        n = sum(1 for _ in quant_layers(qmodel.net))
        self._description = {
            "kernel": "fake" if n else "fp32 PyTorch (no quantized layers)",
            "device": device_name(net_device(qmodel.net)),
            "bits": None if spec is None else spec.tag,
            "quant_layers": n,
        }
        return qmodel
