"""Paper presets compose and validate; the published numbers parse with a source per row; the
aggregator's paper table puts them beside measured rows; the ETA estimate multiplies out correctly."""

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from harness.aggregate.cli import main as aggregate_main
from harness.aggregate.paper import SOURCE_KEYS, read_paper_numbers
from harness.estimate import compose_config, estimate, report
from harness.runner import validate
from harness.store import ResultsStore, RunRecord

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("paper_*.yaml"))
# preset -> (model, sampler, steps, eta, guidance, n_samples): the protocol each preset states
PROTOCOLS = {
    "paper_cifar10_ddim100": ("ddpm_cifar10", "ddim", 100, 0.0, 1.0, 50000),
    "paper_lsun_bedroom_ldm4": ("ldm4_lsun_bedroom", "ddim", 200, 1.0, 1.0, 50000),
    "paper_lsun_church_ldm8": ("ldm8_lsun_church", "ddim", 400, 0.0, 1.0, 50000),
    "paper_imagenet_ldm4": ("ldm4_imagenet", "ddim", 20, 0.0, 3.0, 50000),
    "paper_sd_coco": ("sd_unet", "plms", 50, 0.0, 7.5, 10000),
    "paper_dit_imagenet256": ("dit", "ddpm", 100, 1.0, 1.5, 10000),
}


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=["logger=none", *overrides])


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ref") / "VIRTUAL_ref.npz"
    np.savez(path, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    return path


def test_every_paper_preset_is_covered() -> None:
    assert PRESETS == sorted(PROTOCOLS)


@pytest.mark.parametrize("preset", sorted(PROTOCOLS))
def test_preset_composes_validates_and_states_its_protocol(preset: str, reference: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"<eval.reference=None> must be given"):
        validate(_compose(f"experiment={preset}"))
    rc, raw = validate(_compose(f"experiment={preset}", f"eval.reference={reference}", f"model.path={tmp_path}"))
    model, sampler, steps, eta, guidance, n = PROTOCOLS[preset]
    assert (rc.model["name"], rc.sampler.name, rc.sampler.steps, rc.sampler.eta) == (model, sampler, steps, eta)
    assert (rc.model["guidance_scale"], rc.eval.n_samples, rc.recipe) == (guidance, n, "paper")
    assert rc.eval.extractor == "inception" and rc.eval.reference == str(reference)


def test_paper_numbers_parse_with_a_source_per_row() -> None:
    numbers = read_paper_numbers(ROOT / "results" / "paper")
    assert len(numbers) > 20 and numbers["value"].notna().sum() >= 20
    assert all(numbers[k].str.strip().all() for k in SOURCE_KEYS)
    assert set(numbers["flag"]) == {"self-reported", "re-run"}
    assert set(numbers["preset"]) <= set(PRESETS)
    for preset, model in numbers[["preset", "model"]].drop_duplicates().itertuples(index=False):
        assert PROTOCOLS[preset][0] == model, "paper rows must line up with the preset's runs"
    row = numbers[(numbers["model"] == "ddpm_cifar10") & (numbers["bits"] == "w4a8") & (numbers["method"] == "tfmq")]
    assert row["value"].tolist() == [4.78] and row["flag"].tolist() == ["self-reported"]


def test_a_number_without_its_source_is_refused(tmp_path: Path) -> None:
    text = (ROOT / "results" / "paper" / "qdit_dit_rerun.csv").read_text().splitlines()
    head, first = text[0], text[1].replace("Q-DiT authors", "", 1)
    (tmp_path / "bad.csv").write_text(f"{head}\n{first}\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: every number needs its source; empty \['run_by'\]"):
        read_paper_numbers(tmp_path)


def test_aggregator_puts_paper_rows_beside_measured_ones(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path / "store")
    for seed, fid in ((0, 5.5), (1, 5.9)):
        store.write(RunRecord(run_id=f"r{seed}", model="ddpm_cifar10", method="tfmq", bits="w4a8", backend="fake",
                              sampler="ddim", seed=seed, status="finished", metrics={"fid": fid, "sfid": 4.0}))
    out = tmp_path / "tables"
    assert aggregate_main(["--store", str(store.root), "--out", str(out), "--paper", "--format", "md,latex"]) == 0
    md = (out / "paper.md").read_text()
    measured = next(line for line in md.splitlines() if "this harness" in line)
    assert "| TFMQ-DM | this harness |" in measured and "5.70 ± 0.28" in measured
    assert "| TFMQ-DM | paper: self-reported, TFMQ-DM [tfmq_dm_as_quoted.csv] | 1 | 4.78 |" in md
    assert "**" not in md, "published and measured numbers are shown side by side, never ranked"
    assert "tfmq\\_dm\\_as\\_quoted.csv" in (out / "paper.tex").read_text()


def test_estimate_multiplies_a_timed_denoiser_call_out() -> None:
    raw = compose_config(["experiment=paper_cifar10_ddim100", "model=tiny_unet_cond", "method=qdiff"])
    est = estimate(raw, batch=1, repeats=1)
    assert est["model"] == "tiny_unet_cond" and est["guidance_factor"] == 2 and est["seconds_per_decode"] == 0
    assert est["sampling_seconds"] == pytest.approx(50000 * 100 * 2 * est["seconds_per_row"])
    assert est["calibration_trajectories"] == 128  # 256 rows per step, two CFG rows per trajectory
    assert "sampling 50000 images" in report(est)
