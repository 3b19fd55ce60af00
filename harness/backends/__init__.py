"""Execution backends: how a quantized model actually runs (fake quant, integer kernels, OpenVINO).

To add a backend: write harness/backends/<name>.py with a `Backend` subclass decorated with
`@BACKENDS.register("<name>")` (its `defaults` are the keys of conf/backend/<name>.yaml besides
`name`), add that yaml, and import the module below.
"""

from harness.backends.base import BACKENDS, Backend, DenoiserOutput, ExternalNet

# Importing a backend module registers it.
import harness.backends.fake  # noqa: E402, F401  isort: skip
import harness.backends.int8  # noqa: E402, F401  isort: skip
import harness.backends.openvino  # noqa: E402, F401  isort: skip

__all__ = ["BACKENDS", "Backend", "DenoiserOutput", "ExternalNet"]
