"""The tfmq method: toggle validation, ablation presets, and end to end on a tiny UNet in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harness.calibration import capture_calibration
from harness.config import SamplerConfig
from harness.models.zoo import load_model
from harness.sampling import sample
from methods import METHODS
from methods.engine.modules import QuantSpec, act_quantizers
from methods.temporal.cache import SkippedEmbedding, TemporalFeatureCache, cache_bytes
from methods.temporal.fsc import tib_act_quantizers
from methods.temporal.tib import find_tib
from methods.tfmq import VARIANTS, TfmqToggles

torch.set_num_threads(1)

CONF = Path(__file__).resolve().parents[1] / "conf"
SAMPLER = SamplerConfig("ddim", 4, 0.0)
TINY = {"n_steps": 2, "samples_per_step": 2, "fsc_samples_per_step": 2, "tiar_iters": 20, "tiar_batch_size": 16,
        "iters": 2, "act_iters": 1, "batch_size": 4, "capture_batch_size": 16}


def _method_cfg(**overrides: object) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "method" / "tfmq.yaml"))
    cfg["seed"] = 0  # `${seed}` in the yaml: a run resolves it to the run's seed
    cfg["recipes"]["quick"].update(TINY)
    cfg.update(overrides)
    return cfg


def _model_and_calib(name: str):
    model = load_model(OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{name}.yaml")))
    return model, capture_calibration(model, SAMPLER, n_samples=2, batch_size=2, seed=0)


# -- config ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "message"), [
    ({"select": True, "cache": False, "variant": None}, r"select=true> needs <method.cache=true>"),
    ({"fsc_scope": "layer"}, r"<method.fsc_scope=layer> must be one of tib, all"),
    ({"tiar": "yes"}, r"<method.tiar=yes> must be true or false"),
    ({"variant": "tiar"}, r"<method.variant=tiar> means .*'fsc': False.*set the toggles to match"),
    ({"variant": "full"}, r"<method.variant=full> must be one of brecq, tiar, fsc, tiar_fsc, cache, select"),
])
def test_toggles_are_validated_with_clear_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        METHODS.get("tfmq")(_method_cfg(**overrides))


def test_ablation_presets_compose_into_distinct_consistent_variants() -> None:
    seen = {}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for variant in VARIANTS:
            cfg = compose(config_name="config", overrides=[f"experiment=tfmq_{variant}", "logger=none"])
            method = OmegaConf.to_container(cfg.method, resolve=True)
            assert method["name"] == "tfmq"
            toggles = TfmqToggles.parse(method)
            seen[toggles.variant] = (toggles.tiar, toggles.fsc, toggles.cache, toggles.select)
    assert seen == VARIANTS
    yaml = OmegaConf.load(CONF / "method" / "tfmq.yaml")
    assert yaml.keep_fp == OmegaConf.load(CONF / "method" / "qdiff.yaml").keep_fp, "one FP-layer convention"
    extra = METHODS.get("tfmq")(_method_cfg(fp_time_embedding=True), "quick").keep_fp
    assert "time_embedding.linear_1" in extra and "time_embedding.linear_1" not in yaml.keep_fp


# -- end to end ------------------------------------------------------------------------------------
def test_tfmq_end_to_end_on_class_conditional_unet() -> None:
    model, calib = _model_and_calib("tiny_unet_cond")
    cfg = _method_cfg(fsc_scope="all", fp_time_embedding=True)  # the reference code's scope and FP layers
    result = METHODS.get("tfmq")(cfg, "quick").quantize(model, calib, QuantSpec(4, 8))
    details, net = result.report.details, result.model.net
    assert details["variant"] == "select" and details["fsc"]["scope"] == "all"
    assert details["tiar"]["iters"] == TINY["tiar_iters"] and len(details["tiar"]["layers"]) == 9
    assert "time_embedding.linear_1" in result.report.keep_fp
    assert 0 <= details["adaround"]["soft_fraction"] <= 1 and details["adaround"]["rounding_vars"] > 0
    cache = details["cache"]
    features = details["tib"]["features"]
    assert len(cache["choices"]) == len(features) == 8
    assert sorted(cache["cached_features"] + cache["tib_features"]) == sorted(features)
    for choice in cache["choices"]:
        better = "cache" if choice["cache_error"] <= choice["tib_error"] else "tib"
        assert choice["path"] == better
        assert isinstance(net.get_submodule(choice["feature"]), TemporalFeatureCache) == (better == "cache")
    assert cache["cache_bytes"] == cache_bytes(net) > 0
    all_cached = not cache["tib_features"]
    assert cache["embedders_skipped"] == all_cached
    assert isinstance(net.time_embedding, SkippedEmbedding) == all_cached
    assert all(q.per_timestep for _, q in act_quantizers(net) if q.mode == "quant"), "FSC scope all"

    images = sample(result.model, SAMPLER, 2, 2, seed=1).images
    assert torch.isfinite(images).all()
    with pytest.raises(ValueError, match=r"not calibrated.*sampler schedule \[750, 500, 250, 0\]"):
        sample(result.model, SamplerConfig("ddim", 5, 0.0), 1, 1, seed=1)


def test_brecq_variant_has_no_temporal_maintenance() -> None:
    model, calib = _model_and_calib("tiny_unet")
    cfg = _method_cfg(variant="brecq", tiar=False, fsc=False, cache=False, select=False)
    result = METHODS.get("tfmq")(cfg, "quick").quantize(model, calib, QuantSpec(4, 8))
    details, net = result.report.details, result.model.net
    assert details["variant"] == "brecq" and "tiar" not in details and "cache" not in details
    assert not any(q.per_timestep for _, q in act_quantizers(net))
    assert not any(isinstance(m, TemporalFeatureCache) for m in net.modules())
    images = sample(result.model, SamplerConfig("ddim", 5, 0.0), 1, 1, seed=1).images
    assert torch.isfinite(images).all(), "without FSC or cache any schedule may be sampled"


def test_fsc_scope_tib_gives_per_timestep_ranges_to_the_tib_only() -> None:
    model, calib = _model_and_calib("tiny_unet")
    cfg = _method_cfg(variant="tiar_fsc", cache=False, select=False, act_recon=True)  # fsc_scope tib: default
    result = METHODS.get("tfmq")(cfg, "quick").quantize(model, calib, QuantSpec(4, 8))
    net = result.model.net
    per_t = {name for name, q in act_quantizers(net) if q.per_timestep}
    tib = find_tib(net)
    assert per_t == set(tib_act_quantizers(net, tib)) and len(per_t) == 10, "with time_embedding.linear_1"
    assert result.report.details["fsc"] == {"scope": "tib", "timesteps": calib.schedule,
                                            "per_timestep_quantizers": 10}
    assert "act_recon" in result.report.details, "global quantizers still get their step sizes learned"
    reference = METHODS.get("tfmq")(_method_cfg(variant="tiar_fsc", cache=False, select=False), "quick")
    assert "act_recon" not in reference.quantize(model, calib, QuantSpec(4, 8)).report.details, \
        "the reference code has no activation step-size pass"
