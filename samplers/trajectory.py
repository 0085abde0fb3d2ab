"""The record of one batch of rollouts, batched on the first dimension."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class Trajectory:
    """Everything training needs to replay a rollout exactly.

    Shapes (B samples, S steps, latent shape ``L = [C, H, W]`` or ``[C, F, H, W]``):
      latents:    [B, S+1, *L]  x at sigma_0 (pure noise) .. sigma_S (the sample), fp32
      log_probs:  [B, S]        log p(x_{j+1} | x_j) under the rollout policy; 0 on ODE steps
      pred_x0:    [B, S, *L]    the clean prediction x0_hat = x_j - sigma_j * v_j at every step
      sigmas:     [B, S+1]      noise levels (identical rows; batched so slicing stays uniform)
      stochastic: [B, S] bool   which steps drew noise (only those are trained)
      noise_levels: [B, S] fp32 the noise level (eta) each step drew with; 0 on deterministic steps.
                                Stored so training recomputes each step with the value the rollout used,
                                whatever the sampler's schedule or calibration does meanwhile
      prompt_ids: [B] long      index of the prompt in the run's prompt table
      sample_ids: [B] long      index of the sample within its group
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    pred_x0: torch.Tensor
    sigmas: torch.Tensor
    stochastic: torch.Tensor
    noise_levels: torch.Tensor
    prompt_ids: torch.Tensor
    sample_ids: torch.Tensor

    def __post_init__(self) -> None:
        batch = {f.name: getattr(self, f.name).shape[0] for f in dataclasses.fields(self)}
        if len(set(batch.values())) != 1:
            raise ValueError(f"Trajectory fields disagree on the batch dimension: {batch}")

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, index) -> "Trajectory":
        """Slice or index-select samples (``traj[2:4]``, ``traj[idx_tensor]``)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Trajectory(**{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)})

    @staticmethod
    def cat(parts: list["Trajectory"]) -> "Trajectory":
        return Trajectory(
            **{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Trajectory)}
        )

    @property
    def final(self) -> torch.Tensor:
        """The generated sample x_S, [B, *L]."""
        return self.latents[:, -1]
