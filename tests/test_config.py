"""Config composition (Hydra) and validation at the typed boundary."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from harness.config import RunConfig
from harness.runner import check_device, validate

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_default_config_composes_and_validates() -> None:
    cfg = _compose()
    rc, raw = validate(cfg)
    assert rc.bits.tag == "w4a8" and rc.sampler.name == "ddim"
    assert raw["method"]["name"] == "tfmq"


@pytest.mark.parametrize("group", ["model", "method", "bits", "backend", "sampler", "eval", "logger"])
def test_every_option_of_every_group_composes(group: str) -> None:
    for path in sorted((Path(CONF) / group).glob("*.yaml")):
        cfg = _compose(f"{group}={path.stem}")
        RunConfig.parse(OmegaConf.to_container(cfg, resolve=True))


def test_every_experiment_preset_composes() -> None:
    """Paper presets refuse to run without the user's reference data; every other preset validates."""
    for path in sorted((Path(CONF) / "experiment").glob("*.yaml")):
        if path.stem.startswith("paper_"):
            with pytest.raises(ValueError, match=r"<eval.reference=None> must be given"):
                validate(_compose(f"experiment={path.stem}"))
            # with a reference and weights stand-ins, the preset's method settings pass their schema
            validate(_compose(f"experiment={path.stem}", "eval.reference=fp", "model.init=random"))
        else:
            validate(_compose(f"experiment={path.stem}"))


def test_unknown_option_lists_valid_choices() -> None:
    with pytest.raises(ConfigCompositionException) as err:
        _compose("bits=w3a8")
    assert "w4a8" in str(err.value.__cause__ or err.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("bits.weight_bits=3.5", "<bits.weight_bits=3.5> must be an integer in 2..8"),
        ("bits.act_bits=12", "<bits.act_bits=12> must be an integer in 2..8, or 32"),
        ("sampler.steps=0", "<sampler.steps=0> must be an integer in 1..1000"),
        ("sampler.eta=2.0", "<sampler.eta=2.0> must be a number in [0.0, 1.0]"),
        ("eval.n_samples=1", "<eval.n_samples=1> must be an integer >= 2"),
        ("eval.extractor=clip", "<eval.extractor=clip> must be one of auto, lenet, inception"),
        ("recipe=slow", "<recipe=slow> must be one of quick, paper"),
        ("device=tpu", "<device=tpu> must be auto, cpu, cuda or cuda:N"),
    ],
)
def test_wrong_values_fail_before_loading_with_the_key_named(override: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        validate(_compose(override))
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=qdiff", "method.lr=abc"], "<method.lr=abc> must be a number (float) >= 0.0"),
        (["method=tfmq", "method.fsc_scope=bogus"], "<method.fsc_scope=bogus> must be one of tib, all"),
        (["method=tfmq", "+method.fsc_scop=tib"], "<method.fsc_scop> is not a setting of this method; "
                                                  "did you mean 'fsc_scope'?"),
        (["method=rtn", "method.recipes.quick.calib_rows=1.5"], "<method.recipes.quick.calib_rows=1.5> must be "
                                                                "an integer >= 1"),
        (["method=ptq4dm", "method.beta=[1,2,3]"], "<method.beta=[1, 2, 3]> must be a list of 2 numbers"),
        (["method=rtn", "method.keep_fp=conv_in"], "<method.keep_fp=conv_in> must be a list of strings"),
        (["method=rtn", "~method.recipes"], "<method.calib_rows>, <method.batch_size> are required"),
        (["device=cuda"] if not torch.cuda.is_available() else ["device=cuda:99"], "<device=cuda"),
    ],
)
def test_method_settings_and_device_fail_before_loading(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError) as err:
        validate(_compose(*overrides))
    assert message in str(err.value)


def test_every_method_yaml_matches_its_schema_in_every_recipe() -> None:
    for path in sorted((Path(CONF) / "method").glob("*.yaml")):
        for recipe in ("quick", "paper"):
            validate(_compose(f"method={path.stem}", f"recipe={recipe}"))


def test_cuda_index_beyond_the_visible_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit test with a mocked torch.cuda (two GPUs visible): this machine may have none."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda:1")
    with pytest.raises(ValueError, match=r"<device=cuda:3> but only 2 GPU\(s\) are visible: accepted cuda:0..cuda:1"):
        check_device("cuda:3")
