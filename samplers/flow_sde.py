"""Flow-GRPO's marginal-preserving SDE for flow-matching models, with exact log-probs.

Convention (rectified flow, as SD3/FLUX): x_sigma = (1 - sigma) * x0 + sigma * noise, the model
predicts the velocity v = noise - x0, and sampling runs sigma from ~1 down to 0.

The SDE step (Flow-GRPO, Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL"),
with t = sigma, dt = sigma_next - sigma < 0:

    std_t = eta * sqrt(t / (1 - t))
    mean  = x + (v + std_t^2 / (2 t) * (x + (1 - t) v)) dt
    x'    = mean + std_t * sqrt(-dt) * eps,      eps ~ N(0, I)

so each transition is Gaussian and its log-density is exact. The drift correction is
-(std_t^2 / 2) * score, with the score of x_t written through v: -(x + (1 - t) v) / t; any diffusion
coefficient keeps the marginals in continuous time (DanceGRPO's constant one: samplers/dance_sde.py).
With eta = 0 it is the Euler ODE step ``x + v dt`` used by the diffusers flow-matching scheduler.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from samplers.base import gaussian_log_prob, per_sample  # noqa: F401  (gaussian_log_prob: historical import path)
from samplers.chain import ChainSampler


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


class FlowMatching:
    """What every rectified-flow kernel shares: velocity prediction, x = (1 - sigma) x0 + sigma noise."""

    prediction = "velocity"

    def clean(self, x: torch.Tensor, out: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x - per_sample(sigma, x) * out

    def alpha_sigma(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return 1 - sigma, sigma

    def can_be_stochastic(self, sigmas: torch.Tensor) -> torch.Tensor:
        # The drift correction divides by sigma: a step starting at sigma = 0 cannot carry noise.
        return (sigmas[:-1] > 0) & (sigmas[1:] < sigmas[:-1])


class FlowSDE(FlowMatching):
    """Flow-GRPO's kernel (module docstring)."""

    max_noise_level = float("inf")
    std_carries_sqrt_dt = True  # std = std_t sqrt(-dt) (ChainSampler.kl_std)

    def transition(self, x, out, sigmas, j, eta):
        return sde_transition(x, out, sigmas[:, j], sigmas[:, j + 1], eta, sigma_cap=sigmas[:, 1])


@dataclass(kw_only=True)
class FlowSDESampler(ChainSampler):
    """Flow-GRPO's SDE on the plan's stochastic steps, an ODE solver elsewhere (knobs: conf/sampler/flow_sde.yaml)."""

    kernel = FlowSDE()
