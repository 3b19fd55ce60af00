"""Calibration data: the denoiser inputs an FP sampler produces, captured once per sweep.

`CalibData` holds, for every step of every calibration trajectory, the denoiser's inputs (x_t, t,
condition). With classifier-free guidance both branches are kept (the conditional row and the
null-condition row), because the quantized network sees both at inference. Methods choose their own
subsets (Q-Diffusion: uniform over steps; PTQ4DM: timesteps from a normal over normalized time).

Conditions come from the same source as the evaluation's (`model.conditions`): class labels, or the
prompts of `eval.prompts` encoded by the pipeline's text encoder. Calibration draws them with its own
seed (offset from the eval seed), so it sees a different seeded subset of the labels / prompts than
the evaluation, never the evaluation's exact (noise, condition) pairs. The rows are latents for a
latent pipeline: the denoiser's inputs, whatever decodes them afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from harness.config import SamplerConfig
from harness.models.base import DiffusionModel
from harness.sampling import sample

CALIB_SEED_OFFSET = 100_003


@dataclass
class CalibData:
    """Rows of denoiser inputs. x: (N, C, H, W); t: (N,) long; cond: (N, ...) or None.

    `schedule` lists the sampler's timesteps in the order visited; `num_train_timesteps` is the
    scheduler's T (for normalized time); `labels` are the class labels of a class-conditional model
    including the null label (empty otherwise).
    """

    x: torch.Tensor
    t: torch.Tensor
    cond: torch.Tensor | None
    schedule: list[int]
    num_train_timesteps: int
    labels: list[int]

    def __len__(self) -> int:
        return int(self.t.shape[0])

    def subset(self, idx: torch.Tensor) -> CalibData:
        cond = None if self.cond is None else self.cond[idx]
        return CalibData(self.x[idx], self.t[idx], cond, self.schedule, self.num_train_timesteps, self.labels)

    def at_timesteps(self, timesteps: list[int]) -> CalibData:
        """Rows whose timestep is in `timesteps`."""
        mask = torch.isin(self.t, torch.tensor(timesteps, dtype=self.t.dtype))
        return self.subset(torch.nonzero(mask).flatten())

    def batches(self, batch_size: int, by_timestep: bool = False) -> Iterator[CalibData]:
        """Consecutive batches; with `by_timestep`, each batch holds a single timestep (for FSC)."""
        if by_timestep:
            for ts in self.schedule:
                rows = torch.nonzero(self.t == ts).flatten()
                for i in range(0, rows.numel(), batch_size):
                    yield self.subset(rows[i : i + batch_size])
            return
        for i in range(0, len(self), batch_size):
            yield self.subset(torch.arange(i, min(i + batch_size, len(self))))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensor dict for safetensors."""
        out = {
            "x": self.x.contiguous(),
            "t": self.t.contiguous(),
            "schedule": torch.tensor(self.schedule, dtype=torch.long),
            "num_train_timesteps": torch.tensor([self.num_train_timesteps]),
            "labels": torch.tensor(self.labels, dtype=torch.long),
        }
        if self.cond is not None:
            out["cond"] = self.cond.contiguous()
        return out

    @classmethod
    def from_tensors(cls, d: dict[str, torch.Tensor]) -> CalibData:
        return cls(
            x=d["x"],
            t=d["t"],
            cond=d.get("cond"),
            schedule=d["schedule"].tolist(),
            num_train_timesteps=int(d["num_train_timesteps"][0]),
            labels=d["labels"].tolist(),
        )


def capture_calibration(model: DiffusionModel, sampler: SamplerConfig, n_samples: int, batch_size: int,
                        seed: int) -> CalibData:
    """Run the FP sampler and keep every denoiser input (x_t, t, cond) of every step.

    The seed is offset from the eval seeds so calibration never sees the evaluation noise.
    """
    xs: list[torch.Tensor] = []
    ts: list[torch.Tensor] = []
    cs: list[torch.Tensor] = []

    def record(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> None:
        xs.append(x.detach().float().cpu())
        ts.append(t.detach().cpu())
        if cond is not None:
            cs.append(cond.detach().cpu())

    out = sample(model, sampler, n_samples, batch_size, seed + CALIB_SEED_OFFSET, on_step=record,
                 desc="calibration data")
    labels = [] if model.num_classes is None else list(range(model.num_classes + 1))
    return CalibData(
        x=torch.cat(xs),
        t=torch.cat(ts),
        cond=torch.cat(cs) if cs else None,
        schedule=out.timesteps,
        num_train_timesteps=int(model.scheduler_config.get("num_train_timesteps", 1000)),
        labels=labels,
    )
