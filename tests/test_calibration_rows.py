"""Calibration data is sized by the method's recipe: captured as needed, never silently capped."""

from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from harness.calibration import CalibData
from harness.runner import run
from methods import METHODS
from methods.ptq4dm import normal_timestep_rows
from methods.qdiff import uniform_step_rows

CONF = Path(__file__).resolve().parents[1] / "conf"
SCHEDULE = list(range(980, -1, -20))  # 50 DDIM-like steps over T = 1000


def _calib(rows_per_t: int) -> CalibData:
    t = torch.tensor(SCHEDULE).repeat_interleave(rows_per_t)
    return CalibData(torch.randn(len(t), 1, 2, 2), t, None, SCHEDULE, 1000, [])


def _method(name: str, recipe: str = "paper"):
    cfg = {**yaml.safe_load((CONF / "method" / f"{name}.yaml").read_text()), "seed": 0}
    return METHODS.get(name)(cfg, recipe)


@pytest.mark.parametrize(("name", "per_step"), [("qdiff", 256), ("tfmq", 256), ("rtn", 103)])
def test_paper_recipes_declare_what_they_draw(name: str, per_step: int) -> None:
    """Q-Diffusion / TFMQ-DM: 256 rows at each chosen step; RTN: 5,120 rows over 50 steps."""
    assert _method(name).calibration_rows_per_step(SCHEDULE, 1000) == per_step


def test_ptq4dm_declared_need_is_exactly_what_its_draw_takes() -> None:
    method = _method("ptq4dm")
    need = method.calibration_rows_per_step(SCHEDULE, 1000)
    assert 1024 * 0.1 < need < 1024 * 0.3  # ~16 % of N(0.4, 0.4) falls below t = 0 and lands on t = 0
    cfg = method.cfg
    rows = normal_timestep_rows(_calib(need), cfg["calib_rows"], cfg["t_mean"], cfg["t_std"], 0)
    assert len(rows) == 1024 and len(torch.unique(rows.x, dim=0)) == 1024  # every draw a distinct row
    with pytest.raises(ValueError, match=rf"asks for {need} calibration rows at timestep 0 .* holds {need - 1}"):
        normal_timestep_rows(_calib(need - 1), cfg["calib_rows"], cfg["t_mean"], cfg["t_std"], 0)


def test_request_beyond_the_captured_rows_fails_clearly() -> None:
    """The old behaviour took the 64 rows that existed when 256 were asked for; now it is an error."""
    calib = _calib(64)
    with pytest.raises(ValueError, match=r"<method.samples_per_step> asks for 256 calibration rows at timestep "
                                         r"980, but the captured calibration data holds 64; raise calibration"):
        uniform_step_rows(calib, 20, 256, seed=0)
    assert len(uniform_step_rows(_calib(256), 20, 256, seed=0)) == 5120


def _cfg(tmp: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[
            "model=tiny_unet", "eval=smoke", "logger=none", "sampler.steps=4", "calibration.n_samples=4",
            "fp_reference=false", f"paths.store={tmp / 'store'}", f"paths.artifacts={tmp / 'artifacts'}",
            f"paths.outputs={tmp / 'out'}", *overrides,
        ])


def test_runner_captures_what_the_recipe_needs_and_records_the_rows(tmp_path: Path) -> None:
    """calibration.n_samples=4 is a floor: RTN's 40 rows over 4 steps need 10 trajectories."""
    rec = run(_cfg(tmp_path, "method=rtn", "bits=w8a8", "method.recipes.quick.calib_rows=40"))
    assert rec.status == "finished", rec.traceback
    assert rec.report["calibration_data"] == {"trajectories": 10, "rows": 40, "rows_per_step_requested": 10}
    assert rec.report["details"]["calib_rows"] == 40
