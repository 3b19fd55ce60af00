"""The OpenVINO backend: export with FakeQuantize nodes, run on the OpenVINO CPU runtime.

The traceable twin (harness/backends/fq_export.py) is converted once with `openvino.convert_model`
(TorchScript tracing, dynamic shapes). OpenVINO's CPU plugin lowers FakeQuantize -> Convolution /
MatMul patterns to int8 where it can; `describe()` reports, from the compiled runtime model, how many
convolutions / fully-connected layers really run in int8 ("runtime_precisions").

Per-timestep parameters (FSC / TFMQ) are handled explicitly, as `per_timestep` says:
- `compile` (default): one compiled model per timestep, each with that timestep's parameters baked
  in as constants (compiled lazily, the first time the timestep is met), so every quantized layer
  can be lowered to int8. Costs one compile and one set of weights per timestep.
- `input`: one compiled model; the parameters are a graph input set per call. The FakeQuantize
  nodes with run-time ranges cannot be lowered to int8, so those layers run as fp32 fake quant.
FP models (method fp) are exported as they are: an FP32 IR.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from harness.backends.base import BACKENDS, Backend, ExternalNet
from harness.backends.fq_export import ExportWrapper, QParamTable, export_twin
from harness.models.base import DiffusionModel
from methods.engine.context import current_timestep, timestep_scope
from methods.engine.modules import QuantSpec

PER_TIMESTEP = ("compile", "input")
QPARAMS = "qparams"
CACHE_POS = "cache_pos"
COUNTED_OPS = ("Convolution", "FullyConnected", "MatMul")


def _openvino() -> Any:
    try:
        import openvino
        import openvino.passes  # noqa: F401  (a submodule `import openvino` does not load)
    except ImportError as err:  # optional extra
        raise ImportError("backend=openvino needs the openvino package: "
                          "pip install 'diffptq-harness[openvino]'") from err
    return openvino


def _example_inputs(wrapper: ExportWrapper, model: DiffusionModel) -> dict[str, torch.Tensor]:
    """Batch 2 (not 1), so that nothing batch-size specific is baked into the traced graph."""
    batch = 2
    t = wrapper.table
    timestep = int(model.scheduler_config.get("num_train_timesteps", 1000)) // 2
    if t.slots:  # a timestep the per-timestep parameters and the caches know
        timestep = int(t.slots[0].ts_keys[0])
    elif t.caches:
        timestep = int(t.caches[0].timesteps[0])
    inputs = {"sample": torch.randn(batch, *model.sample_shape), "timestep": torch.full((batch,), int(timestep))}
    if model.num_classes is not None:
        inputs["cond"] = torch.zeros(batch, dtype=torch.long)
    elif model.cond_shape is not None:
        inputs["cond"] = torch.zeros(batch, *model.cond_shape)
    if t.slots:
        inputs[QPARAMS] = t.values(int(timestep))
    if t.caches:
        labels = inputs["cond"] if model.num_classes is not None else None
        inputs[CACHE_POS] = t.positions(inputs["timestep"], labels)
    return inputs


def runtime_precisions(compiled: Any) -> dict[str, int]:
    """'<op> <precision>' -> count over the compiled graph, for the ops that carry the FLOPs."""
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str)
        if kind in COUNTED_OPS:
            key = f"{kind} {info['runtimePrecision'].astype(str)}"
            counts[key] = counts.get(key, 0) + 1
    return counts


class OpenVINONet(ExternalNet):
    """Runs the compiled model(s); picks the per-timestep one when parameters depend on t."""

    def __init__(self, backend: OpenVINOBackend, ov_model: Any, names: list[str], table: QParamTable,
                 per_timestep: str | None, labelled: bool) -> None:
        super().__init__()
        self.backend, self.ov_model = backend, ov_model
        self.names = [n for n in names if not (per_timestep == "compile" and n == QPARAMS)]
        self.table, self.per_timestep, self.labelled = [table], per_timestep, labelled
        self.requests: dict[int | None, Any] = {}
        if per_timestep != "compile":
            self.requests[None] = backend.compile(ov_model).create_infer_request()

    def _request(self, t: int | None) -> Any:
        if t not in self.requests:
            baked = self.backend.bake(self.ov_model, self.table[0].values(t))
            self.requests[t] = self.backend.compile(baked).create_infer_request()
        return self.requests[t]

    def run(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        feed = {"sample": x.detach().cpu().float().numpy(), "timestep": t.detach().cpu().long().numpy()}
        if cond is not None:
            feed["cond"] = cond.detach().cpu().numpy()
        key = None
        if self.per_timestep is not None:
            with timestep_scope(t):
                step = current_timestep()  # one timestep per batch, as the fake quantizers require
            if self.per_timestep == "compile":
                key = step
            else:
                feed[QPARAMS] = self.table[0].values(step).numpy()
        if CACHE_POS in self.names:
            feed[CACHE_POS] = self.table[0].positions(t, cond if self.labelled else None).numpy()
        request = self._request(key)
        request.infer({name: feed[name] for name in self.names})
        out = torch.from_numpy(np.array(request.get_output_tensor(0).data, copy=True))
        return out.to(x.device)


@BACKENDS.register("openvino")
class OpenVINOBackend(Backend):
    """FakeQuantize export -> OpenVINO CPU runtime."""

    name = "openvino"
    defaults: dict[str, Any] = {"per_timestep": "compile", "inference_precision": "f32", "num_threads": None}

    def __init__(self, cfg: dict[str, Any] | None = None) -> None:
        super().__init__(cfg)
        if self.cfg["per_timestep"] not in PER_TIMESTEP:
            raise ValueError(f"<backend.per_timestep={self.cfg['per_timestep']}> is invalid; accepted: "
                             f"{', '.join(PER_TIMESTEP)}")
        self.compile_seconds = 0.0
        self.compiled: list[Any] = []

    def compile(self, ov_model: Any) -> Any:
        ov = _openvino()
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": str(self.cfg["inference_precision"])}
        if self.cfg["num_threads"] is not None:
            config["INFERENCE_NUM_THREADS"] = int(self.cfg["num_threads"])
        start = time.perf_counter()
        compiled = ov.Core().compile_model(ov_model, "CPU", config)
        self.compile_seconds += time.perf_counter() - start
        self.compiled.append(compiled)
        self._description.update(self._runtime_facts())
        return compiled

    @staticmethod
    def bake(ov_model: Any, values: torch.Tensor) -> Any:
        """A copy of the model with the `qparams` input replaced by constants (one timestep's)."""
        ov = _openvino()
        model = ov_model.clone()
        param = next(p for p in model.get_parameters() if p.get_friendly_name() == QPARAMS)
        const = ov.opset13.constant(values.numpy().astype(np.float32))
        for target in list(param.output(0).get_target_inputs()):
            target.replace_source_output(const.output(0))
        params = [p for p in model.get_parameters() if p.get_friendly_name() != QPARAMS]
        baked = ov.Model(model.get_results(), params, model.get_friendly_name())
        # Fold the range arithmetic now: the CPU plugin lowers a FakeQuantize to int8 only when its
        # ranges are Constant nodes by the time its low-precision transformations run.
        passes = ov.passes.Manager()
        passes.register_pass(ov.passes.ConstantFolding())
        passes.run_passes(baked)
        return baked

    def prepare(self, qmodel: DiffusionModel, spec: QuantSpec | None) -> DiffusionModel:
        ov = _openvino()
        wrapper = export_twin(qmodel)
        example = _example_inputs(wrapper, qmodel)
        per_timestep = str(self.cfg["per_timestep"]) if wrapper.table.slots else None
        start = time.perf_counter()
        with torch.no_grad():
            ov_model = ov.convert_model(wrapper.cpu(), example_input=example)
        for param, name in zip(ov_model.get_parameters(), example, strict=True):
            param.set_friendly_name(name)
        self._description = {
            "device": f"openvino-cpu ({ov.Core().get_property('CPU', 'FULL_DEVICE_NAME')})",
            "openvino_version": ov.__version__,
            "bits": None if spec is None else spec.tag,
            "per_timestep": per_timestep,
            "per_timestep_quantizers": len(wrapper.table.slots),
            "feature_caches": len(wrapper.table.caches),
            "convert_seconds": time.perf_counter() - start,
            "inference_precision": self.cfg["inference_precision"],
        }
        net = OpenVINONet(self, ov_model, list(example), wrapper.table, per_timestep, qmodel.num_classes is not None)
        if per_timestep == "compile":  # compile the example's timestep now, so describe() is complete
            net._request(int(example["timestep"][0]))
        return qmodel.with_net(net)

    def _runtime_facts(self) -> dict[str, Any]:
        precisions = runtime_precisions(self.compiled[-1])
        int8 = sum(n for k, n in precisions.items() if k.endswith(("u8", "i8")))
        return {
            "kernel": "openvino-cpu int8" if int8 else f"openvino-cpu {self.cfg['inference_precision']}",
            "runtime_precisions": precisions,
            "compiled_models": len(self.compiled),
            "compile_seconds": self.compile_seconds,
        }
