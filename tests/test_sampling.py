"""Seeded sampling and calibration capture on a tiny random UNet."""

import torch
from diffusers import UNet2DModel

from harness.calibration import CalibData, capture_calibration
from harness.config import SamplerConfig
from harness.models.base import DiffusionModel
from harness.sampling import initial_noise, sample, schedule_timesteps

SCHED = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


def tiny_model(num_classes: int | None = None, guidance: float = 1.0) -> DiffusionModel:
    torch.manual_seed(0)
    net = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                      layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                      num_class_embeds=None if num_classes is None else num_classes + 1).eval()
    return DiffusionModel("tiny", "unet", net, SCHED, (1, 8, 8), num_classes=num_classes, guidance_scale=guidance)


def test_noise_depends_only_on_seed_and_index() -> None:
    m = tiny_model()
    full = initial_noise(m, 3, 0, 2500)
    assert torch.equal(initial_noise(m, 3, 990, 20), full[990:1010])
    assert not torch.equal(initial_noise(m, 4, 0, 10), full[:10])


def test_samples_do_not_depend_on_batch_size() -> None:
    m, cfg = tiny_model(), SamplerConfig("ddim", 5, 0.0)
    a = sample(m, cfg, 6, 6, seed=1, n_trajectory=3)
    b = sample(m, cfg, 6, 4, seed=1, n_trajectory=3)
    assert torch.allclose(a.images, b.images, atol=1e-5)
    assert a.trajectory.shape == (5, 3, 1, 8, 8)
    assert torch.allclose(a.trajectory, b.trajectory, atol=1e-5)


def test_calibration_records_every_visited_timestep_and_both_cfg_branches() -> None:
    m, cfg = tiny_model(num_classes=3, guidance=2.0), SamplerConfig("ddim", 4, 0.0)
    calib = capture_calibration(m, cfg, n_samples=5, batch_size=5, seed=0)
    assert calib.schedule == schedule_timesteps(m, cfg)
    assert sorted(set(calib.t.tolist())) == sorted(calib.schedule)
    assert len(calib) == 5 * 4 * 2, "conditional and null rows for every step"
    assert (calib.cond == 3).sum() == 5 * 4, "half the rows carry the null label"
    assert calib.labels == [0, 1, 2, 3]
    back = CalibData.from_tensors(calib.tensors())
    assert torch.equal(back.x, calib.x) and back.schedule == calib.schedule
    for batch in calib.batches(7, by_timestep=True):
        assert batch.t.unique().numel() == 1


def test_labels_are_drawn_with_the_seed_per_index() -> None:
    m = tiny_model(num_classes=3, guidance=2.0)
    labels = m.conditions.draw(0, 0, 2500)
    assert labels.min() == 0 and labels.max() == 2 and labels.tolist() != [i % 3 for i in range(2500)]
    assert torch.equal(m.conditions.draw(0, 990, 20), labels[990:1010]), "a shard draws exactly its slice"
    assert not torch.equal(m.conditions.draw(1, 0, 50), labels[:50]), "another seed, other labels"
    s = sample(m, SamplerConfig("ddim", 2, 0.0), 4, 4, seed=0)
    assert torch.equal(s.conds, labels[:4]) and s.latents is None, "pixel-space models carry no latents"
