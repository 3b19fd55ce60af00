"""RTN, PTQ4DM and Q-Diffusion on tiny models of every family, through the Method contract."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from test_engine_blocks import FAMILIES, SCHEDULER, tiny_calib, tiny_model

from harness.calibration import CalibData
from harness.models.base import DiffusionModel, denoise
from methods import METHODS
from methods.engine.modules import QuantSpec, act_quantizers, quant_layers
from methods.ptq4dm import normal_timestep_rows
from methods.qdiff import uniform_step_rows
from methods.settings import check_settings

torch.set_num_threads(1)

CONF = Path(__file__).resolve().parents[1] / "conf" / "method"
BASELINES = ["rtn", "ptq4dm", "qdiff"]
TINY = {"iters": 2, "act_iters": 2, "calib_rows": 8, "n_steps": 2, "samples_per_step": 4,
        "weight_init": "minmax", "act_init": "minmax"}


def _yaml(name: str) -> dict:
    """A method's yaml as a run resolves it: `seed: ${seed}` takes the run's seed (0 here)."""
    cfg = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    assert cfg["seed"] == "${seed}", "a method's randomness follows the run's seed"
    return {**cfg, "seed": 0}


def _cfg(name: str, **over) -> dict:
    cfg = _yaml(name)
    cfg.update({k: v for k, v in {**TINY, **over}.items() if k in ("weight_init", "act_init")})
    cfg["recipes"]["quick"].update({k: v for k, v in {**TINY, **over}.items() if k not in cfg})
    return cfg


def _rel_error(a: DiffusionModel, b: DiffusionModel, calib: CalibData) -> float:
    with torch.no_grad():
        ref, out = denoise(a, calib.x, calib.t, calib.cond), denoise(b, calib.x, calib.t, calib.cond)
    return float((out - ref).norm() / ref.norm())


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> tuple[DiffusionModel, CalibData]:
    model = tiny_model(request.param)
    return model, tiny_calib(model, n=4, steps=4)  # 4 rows per step: what TINY's recipes draw at most


@pytest.mark.parametrize("name", BASELINES)
def test_method_runs_on_every_family(name: str, family) -> None:
    model, calib = family
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    result = METHODS.get(name)(_cfg(name), "quick").quantize(model, calib, QuantSpec(4, 8))
    net = result.model.net
    assert all(torch.equal(v, before[k]) for k, v in model.net.state_dict().items())  # FP model untouched
    assert not list(quant_layers(model.net))
    layers = dict(quant_layers(net))
    assert layers and all(layer.w_q is not None for layer in layers.values())
    assert not any(n in layers for n in ("conv_in", "conv_out", "pos_embed.proj", "proj_out_2"))
    assert all(q.mode == "quant" for _, q in act_quantizers(net))
    assert any(n.endswith("softmax_quantizer") for n, _ in act_quantizers(net))
    assert result.report.recipe["batch_size"] == _cfg(name)["recipes"]["quick"]["batch_size"]
    assert result.report.calib_seconds > 0
    assert 0 < _rel_error(model, result.model, calib) < 0.6
    if name != "rtn":
        recon = result.report.details.get("recon") or result.report.details["weight_recon"]
        assert recon["blocks"] and all(b["iters"] == 2 for b in recon["blocks"].values())
    if name == "qdiff" and model.family != "dit":
        assert any(".up_blocks." in f".{n}" and n.endswith(".conv1") for n in result.report.details["split_layers"])


def test_rtn_error_shrinks_to_zero_with_bits() -> None:
    """W8A8 stays close to FP (on a random net the error is mostly the per-tensor 8-bit range of the
    skip-connection inputs), W8A32 closer, W16A16 is the identity up to float noise."""
    model = tiny_model("unet")
    calib = tiny_calib(model, n=4, steps=4)
    errors = {}
    for w, a in ((4, 8), (8, 8), (8, None), (16, 16)):
        result = METHODS.get("rtn")(_cfg("rtn", calib_rows=len(calib)), "quick").quantize(model, calib, QuantSpec(w, a))
        errors[(w, a)] = _rel_error(model, result.model, calib)
    assert errors[(8, 8)] < 0.15 and errors[(8, 8)] < errors[(4, 8)]
    assert errors[(8, None)] < 0.02
    assert errors[(16, 16)] < 1e-3


def test_w4a32_quantizes_weights_only() -> None:
    model = tiny_model("unet")
    calib = tiny_calib(model, n=4, steps=2)
    result = METHODS.get("qdiff")(_cfg("qdiff"), "quick").quantize(model, calib, QuantSpec(4, None))
    assert not list(act_quantizers(result.model.net))
    assert "act_recon" not in result.report.details


def _dense_calib(rows_per_t: int = 4) -> CalibData:
    schedule = list(range(980, -1, -20))  # 50 DDIM-like steps over T = 1000
    t = torch.tensor(schedule).repeat_interleave(rows_per_t)
    return CalibData(torch.randn(len(t), 1, 2, 2), t, None, schedule, SCHEDULER["num_train_timesteps"], [])


def test_ptq4dm_timesteps_follow_the_normal_over_normalized_time() -> None:
    calib = _dense_calib(rows_per_t=400)  # enough rows for the ~16 % of 2000 draws that land on t = 0
    rows = normal_timestep_rows(calib, 2000, mean=0.4, std=0.4, seed=0)
    u = rows.t.double() / 1000
    assert len(rows) == 2000 and set(rows.t.tolist()) <= set(calib.schedule)
    assert abs(float(u.median()) - 0.4) < 0.05  # clipping to [0, 0.98] keeps the median
    assert float((rows.t == 0).double().mean()) > 0.1  # P(u < 0) ~ 16 % lands on the first step
    calib = _dense_calib(rows_per_t=12)
    narrow = normal_timestep_rows(calib, 12, mean=0.4, std=0.01, seed=0)
    assert set(narrow.t.tolist()) <= {360, 380, 400, 420, 440}
    assert int(torch.unique(narrow.x, dim=0).shape[0]) == 12  # every draw is a distinct row, none reused
    with pytest.raises(ValueError, match=r"<method.calib_rows> asks for \d+ calibration rows at timestep \d+ "
                                         r"\(drawn \d+ times\), but the captured calibration data holds 12"):
        normal_timestep_rows(calib, 500, mean=0.4, std=0.01, seed=0)


def test_qdiff_rows_are_uniform_over_steps() -> None:
    calib = _dense_calib(rows_per_t=6)
    rows = uniform_step_rows(calib, n_steps=5, samples_per_step=4, seed=0)
    ts, counts = torch.unique(rows.t, return_counts=True)
    assert sorted(ts.tolist(), reverse=True) == [980, 740, 500, 240, 0]  # step indices 0, 12, 24, 37, 49
    assert counts.tolist() == [4] * 5


@pytest.mark.parametrize("name", BASELINES)
def test_paper_recipe_carries_the_papers_values(name: str) -> None:
    cfg = _yaml(name)
    assert cfg["name"] == name and set(cfg["recipes"]) == {"quick", "paper"}
    assert set(cfg["recipes"]["quick"]) == set(cfg["recipes"]["paper"])
    paper = METHODS.get(name)(cfg, "paper").cfg
    if name != "rtn":
        assert paper["iters"] == 20000 and paper["batch_size"] == 32
    if name == "qdiff":
        assert paper["n_steps"] * paper["samples_per_step"] == 5120 and paper["act_iters"] == 5000


def test_ptq4dm_released_variant_is_the_released_script() -> None:
    """NDTC rows, MSE ranges, symmetric grids, first / last layer quantized at 8 bits, no reconstruction."""
    model = tiny_model("unet")
    calib = tiny_calib(model, n=4, steps=4)
    result = METHODS.get("ptq4dm")({**_cfg("ptq4dm"), "variant": "released"}, "quick").quantize(
        model, calib, QuantSpec(4, 8))
    details, layers = result.report.details, dict(quant_layers(result.model.net))
    assert details["variant"] == "released" and "recon" not in details and "adaround" not in details
    assert sorted(details["eight_bit_layers"]) == ["conv_in", "conv_out"] and result.report.keep_fp == []
    assert layers["conv_in"].weight_quantizer.bits == 8 and layers["conv_out"].act_quantizer.bits == 8
    others = [layer for n, layer in layers.items() if n not in ("conv_in", "conv_out")]
    assert all(layer.weight_quantizer.bits == 4 and layer.weight_quantizer.symmetric for layer in others)
    assert all(q.symmetric for _, q in act_quantizers(result.model.net))
    assert METHODS.get("ptq4dm").full_variant == "qdrop", "the main table's PTQ4DM is the QDrop variant"


def test_symmetric_grids_and_split_weights_come_from_the_config() -> None:
    model = tiny_model("unet")
    calib = tiny_calib(model, n=4, steps=4)
    cfg = {**_cfg("qdiff"), "weight_symmetric": True, "act_symmetric": False, "split_weights": True}
    result = METHODS.get("qdiff")(cfg, "quick").quantize(model, calib, QuantSpec(4, 8))
    layers = dict(quant_layers(result.model.net))
    assert all(layer.weight_quantizer.symmetric for layer in layers.values())
    assert not any(q.symmetric for n, q in act_quantizers(result.model.net) if not n.endswith("softmax_quantizer"))
    split = [layers[n] for n in result.report.details["split_layers"]]
    assert split and all(layer.weight_quantizer_split is not None for layer in split)
    assert 0 <= result.report.details["adaround"]["soft_fraction"] <= 1
    assert _yaml("qdiff")["act_symmetric"] is True, "Q-Diffusion's README runs use --a_sym"
    with pytest.raises(ValueError, match="act_inputs"):
        check_settings(METHODS.get("qdiff"), {**_cfg("qdiff"), "act_inputs": "both"}, "quick")


def test_footprint_reports_the_models_own_memory(family) -> None:
    """report.footprint: weights at the target bit-width (4-bit below fp32) and the activation peak of
    one denoiser call, which grows with the batch and holds at least the call's output."""
    model, calib = family
    method = METHODS.get("rtn")(_cfg("rtn", calib_rows=len(calib)), "quick")
    fp = METHODS.get("fp")({"name": "fp"}, "quick").quantize(model, None, None, footprint_batch=4).report.footprint
    small = method.quantize(model, calib, QuantSpec(4, 8), footprint_batch=2).report.footprint
    big = method.quantize(model, calib, QuantSpec(4, 8), footprint_batch=8).report.footprint
    assert small["model_weight_bytes"] == big["model_weight_bytes"] < fp["model_weight_bytes"]
    out_bytes = 8 * torch.Size(model.sample_shape).numel() * 4
    assert big["activation_peak_bytes"] >= out_bytes and big["activation_peak_bytes"] > small["activation_peak_bytes"]
    assert big["footprint_batch_size"] == 8 and fp["activation_peak_bytes"] > 0
