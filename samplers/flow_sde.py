"""Flow-matching rollouts: Flow-GRPO's marginal-preserving SDE and the Euler ODE, with exact log-probs.

Convention (rectified flow, as SD3/FLUX): x_sigma = (1 - sigma) * x0 + sigma * noise, the model
predicts the velocity v = noise - x0, and sampling runs sigma from ~1 down to 0.

The SDE step (Flow-GRPO, Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL"),
with t = sigma, dt = sigma_next - sigma < 0:

    std_t = eta * sqrt(t / (1 - t))
    mean  = x + (v + std_t^2 / (2 t) * (x + (1 - t) v)) dt
    x'    = mean + std_t * sqrt(-dt) * eps,      eps ~ N(0, I)

so each transition is Gaussian and its log-density is exact. With eta = 0 it is the Euler ODE step
``x + v dt`` used by the diffusers flow-matching scheduler.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from samplers.trajectory import Trajectory

# predict_fn(x [B, *L] fp32, sigma [B] fp32, cond) -> velocity [B, *L] (any float dtype)
PredictFn = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: str) -> torch.Tensor:
    """Log-density of ``x`` under N(mean, std^2 I), reduced over all but the batch dim.

    Args:
      x, mean: [B, *L]; std: [B] (one isotropic scale per sample), all fp32.
      reduction: "sum" gives the true log-density of the whole sample; "mean" divides it by the
        number of elements (Flow-GRPO's convention, which keeps ratios on the scale its clip
        ranges were tuned for).
    Returns: [B] fp32.
    """
    std = std.reshape(-1, *([1] * (x.dim() - 1)))
    elem = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    if reduction == "sum":
        return elem.flatten(1).sum(1)
    if reduction == "mean":
        return elem.flatten(1).mean(1)
    raise ValueError(f"sampler.log_prob_reduction must be 'sum' or 'mean', got {reduction!r}")


def sde_transition(
    x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float, sigma_cap: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of one Flow-SDE transition, in fp32.

    Args:
      x, v: [B, *L] current sample and predicted velocity.
      sigma, sigma_next: [B] noise levels of this step and the next (sigma_next < sigma).
      eta: noise level (0 gives the deterministic Euler step, std 0).
      sigma_cap: [B] value used for sigma in ``1 - sigma`` when sigma == 1, where std_t is
        infinite; Flow-GRPO uses the schedule's second sigma.
    Returns: (mean [B, *L], std [B]) with std = std_t * sqrt(-dt).
    """
    # fp32 whatever the model ran in: the log-prob ratio of two nearly identical policies is a
    # difference of large numbers, and bf16 would drown it.
    x, v = x.float(), v.float()
    sigma, sigma_next, sigma_cap = sigma.float(), sigma_next.float(), sigma_cap.float()
    shape = (-1,) + (1,) * (x.dim() - 1)
    dt = (sigma_next - sigma).reshape(shape)
    t = sigma.reshape(shape)
    if eta == 0.0:
        return x + dt * v, torch.zeros_like(sigma)
    denom = 1 - torch.where(sigma >= 1, sigma_cap, sigma)
    std_t = (eta * torch.sqrt(sigma / denom)).reshape(shape)
    mean = x + (v + std_t**2 / (2 * t) * (x + (1 - t) * v)) * dt
    return mean, (std_t * torch.sqrt(-dt)).reshape(-1)


@dataclass
class FlowSDESampler:
    """Flow-GRPO's SDE on a window of steps, Euler ODE elsewhere.

    Args:
      noise_level: eta. 0 makes every step deterministic (evaluation).
      window_start, window_size: the stochastic steps are [window_start, window_start + window_size);
        window_size None means every step from window_start on.
      log_prob_reduction: "mean" (Flow-GRPO) or "sum" (true density).
      num_steps, eval_num_steps: steps of training rollouts and of (ODE) evaluation.
      guidance_scale: classifier-free guidance used in rollouts and evaluation (1 = off).
    """

    noise_level: float = 0.7
    window_start: int = 0
    window_size: int | None = None
    log_prob_reduction: str = "mean"
    num_steps: int = 10
    eval_num_steps: int = 10
    guidance_scale: float = 4.5

    def stochastic_steps(self, num_steps: int) -> torch.Tensor:
        """[S] bool: which steps draw noise (and are therefore trained)."""
        mask = torch.zeros(num_steps, dtype=torch.bool)
        if self.noise_level > 0:
            end = num_steps if self.window_size is None else min(num_steps, self.window_start + self.window_size)
            mask[self.window_start : end] = True
        return mask

    def step(
        self, predict_fn: PredictFn, x: torch.Tensor, sigmas: torch.Tensor, j: int, cond: object, stochastic: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Velocity, transition mean and std of step j. The one arithmetic path for rollout and training.

        Args: x [B, *L] fp32; sigmas [B, S+1]. Returns (v [B, *L], mean [B, *L], std [B]).
        """
        sigma, sigma_next = sigmas[:, j], sigmas[:, j + 1]
        v = predict_fn(x, sigma, cond).float()
        eta = self.noise_level if stochastic else 0.0
        mean, std = sde_transition(x, v, sigma, sigma_next, eta, sigma_cap=sigmas[:, 1])
        return v, mean, std

    @torch.no_grad()
    def rollout(
        self,
        predict_fn: PredictFn,
        x_T: torch.Tensor,
        sigmas: torch.Tensor,
        cond: object,
        generators: Sequence[torch.Generator],
        prompt_ids: torch.Tensor,
        sample_ids: torch.Tensor,
    ) -> Trajectory:
        """Sample B trajectories.

        Args:
          x_T: [B, *L] initial noise (drawn by the caller from the same per-sample generators).
          sigmas: [S+1] decreasing noise levels ending at 0.
          generators: one per sample, so each sample's noise depends only on its own seed and not
            on the batch it happens to share (bitwise identical on 1 or N processes).
        """
        B, S = x_T.shape[0], sigmas.numel() - 1
        if len(generators) != B:
            raise ValueError(f"rollout needs one generator per sample: got {len(generators)} for batch {B}")
        sig = sigmas.float().unsqueeze(0).expand(B, -1).contiguous()
        stochastic = self.stochastic_steps(S)
        x = x_T.float()
        latents, log_probs, pred_x0 = [x], [], []
        for j in range(S):
            v, mean, std = self.step(predict_fn, x, sig, j, cond, bool(stochastic[j]))
            pred_x0.append(x - sig[:, j].reshape(-1, *([1] * (x.dim() - 1))) * v)
            if stochastic[j]:
                eps = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]).to(x.device)
                x = mean + std.reshape(-1, *([1] * (x.dim() - 1))) * eps
                log_probs.append(gaussian_log_prob(x, mean, std, self.log_prob_reduction))
            else:
                x = mean
                log_probs.append(torch.zeros(B, device=x.device))
            latents.append(x)
        return Trajectory(
            latents=torch.stack(latents, 1),
            log_probs=torch.stack(log_probs, 1),
            pred_x0=torch.stack(pred_x0, 1),
            sigmas=sig,
            stochastic=stochastic.unsqueeze(0).expand(B, -1).to(x.device),
            prompt_ids=prompt_ids,
            sample_ids=sample_ids,
        )

    def log_prob(
        self, predict_fn: PredictFn, traj: Trajectory, j: int, cond: object
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Recompute step j's log-prob of the stored transition under ``predict_fn`` (with grad).

        Uses exactly the rollout's arithmetic, so before any update the ratio is exactly 1.
        Returns (log_prob [B], mean [B, *L], std [B]).
        """
        if not bool(traj.stochastic[0, j]):
            raise ValueError(f"step {j} was deterministic in this trajectory; only stochastic steps have a log-prob")
        _, mean, std = self.step(predict_fn, traj.latents[:, j], traj.sigmas, j, cond, True)
        return gaussian_log_prob(traj.latents[:, j + 1], mean, std, self.log_prob_reduction), mean, std
