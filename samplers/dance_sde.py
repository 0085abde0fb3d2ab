"""DanceGRPO's SDE for flow-matching models: Flow-GRPO's drift with a constant diffusion coefficient.

DanceGRPO (Xue et al. 2025, "DanceGRPO: Unleashing GRPO on Visual Generation") steps with t = sigma,
dt = sigma_next - sigma < 0 and a constant eta:

    mean = x + (v + eta^2 / (2 t) * (x + (1 - t) v)) dt       (Euler drift minus (eta^2 / 2) * score dt)
    std  = eta * sqrt(-dt)

i.e. the reverse-time SDE with diffusion coefficient eta, which keeps the marginals of the flow for any
eta. Unlike Flow-GRPO's eta * sqrt(t / (1 - t)), the noise does not grow near t = 1, so no cap is
needed there. DanceGRPO uses eta = 0.3.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from samplers.base import per_sample
from samplers.chain import ChainSampler
from samplers.flow_sde import FlowMatching


def dance_transition(
    x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [B, *L], std [B]) of one DanceGRPO step in fp32; eta 0 is the Euler step."""
    x, v, sigma, sigma_next = x.float(), v.float(), sigma.float(), sigma_next.float()
    dt, t = per_sample(sigma_next - sigma, x), per_sample(sigma, x)
    if eta == 0.0:
        return x + dt * v, torch.zeros_like(sigma)
    mean = x + (v + eta**2 / (2 * t) * (x + (1 - t) * v)) * dt
    return mean, eta * torch.sqrt(sigma - sigma_next)


class DanceSDE(FlowMatching):
    max_noise_level = float("inf")
    std_carries_sqrt_dt = True  # std = eta sqrt(-dt): std_t = eta (ChainSampler.kl_std)

    def transition(self, x, out, sigmas, j, eta):
        return dance_transition(x, out, sigmas[:, j], sigmas[:, j + 1], eta)


@dataclass(kw_only=True)
class DanceSDESampler(ChainSampler):
    """DanceGRPO's SDE on the plan's stochastic steps (knobs: conf/sampler/dance_sde.yaml)."""

    kernel = DanceSDE()
