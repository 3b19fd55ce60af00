"""The backend contract: registry, config validation, describe(), the diffusers call signature."""

from __future__ import annotations

import pytest
import torch
from test_backends_fixtures import inputs, quantized_tiny, tiny_model

from harness.backends import BACKENDS, ExternalNet
from harness.backends.base import DenoiserOutput
from harness.models.base import DiffusionModel, denoise
from methods.engine.modules import QuantSpec


def test_registry_lists_the_three_backends_and_suggests():
    assert BACKENDS.names() == ["fake", "int8", "openvino"]
    with pytest.raises(KeyError, match="Did you mean 'int8'"):
        BACKENDS.get("int9")


def test_unknown_config_key_names_the_accepted_ones():
    with pytest.raises(ValueError, match="backend.kernel is not a key of backend fake; accepted: none"):
        BACKENDS.get("fake")({"name": "fake", "kernel": "auto"})


def test_describe_needs_prepare():
    with pytest.raises(RuntimeError, match="after prepare"):
        BACKENDS.get("fake")({}).describe()


def test_fake_is_the_identity():
    torch.set_num_threads(1)
    model = tiny_model()
    spec = QuantSpec(8, 8)
    qm = quantized_tiny(model, spec)
    backend = BACKENDS.get("fake")({"name": "fake"})
    assert backend.prepare(qm, spec) is qm
    facts = backend.describe()
    assert facts["backend"] == "fake" and facts["kernel"] == "fake" and facts["bits"] == "w8a8"
    assert facts["device"].startswith("cpu")


class _Doubler(ExternalNet):
    def run(self, x, t, cond):
        self.seen = (t.clone(), cond)
        return 2 * x


@pytest.mark.parametrize("family", ["unet", "unet_text", "dit"])
def test_external_net_accepts_every_diffusers_call_style(family):
    cond = {"unet": None, "unet_text": torch.zeros(2, 3, 4), "dit": torch.tensor([1, 2])}[family]
    model = DiffusionModel("m", family, _Doubler(), {}, (1, 4, 4), num_classes=None if family != "dit" else 3,
                           cond_shape=(3, 4) if family == "unet_text" else None)
    x, t, _ = inputs(model, 2, 7)
    out = denoise(model, x, t, cond)
    assert torch.equal(out, 2 * x)
    seen_t, seen_cond = model.net.seen
    assert seen_t.tolist() == [7, 7] and (seen_cond is cond)
    scalar = model.net(x, 7, return_dict=False)[0]  # scalar timestep broadcast, tuple output
    assert torch.equal(scalar, 2 * x) and model.net.seen[0].tolist() == [7, 7]
    assert isinstance(model.net(x, t), DenoiserOutput)
