"""Coefficients-preserving sampling (CPS) for flow-matching models.

CPS (Wang & Yu 2025, "Coefficients-Preserving Sampling for Reinforcement Learning with Flow Matching")
re-composes the next state from the current clean and noise predictions so that its coefficients are
exactly those of the marginal at sigma_next, x = (1 - sigma_next) x0 + sigma_next * noise:

    x0_hat  = x - sigma v,   eps_hat = x + (1 - sigma) v
    std     = sigma_next * sin(eta * pi / 2)
    mean    = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) eps_hat
            = (1 - sigma_next) x0_hat + sigma_next * cos(eta * pi / 2) eps_hat

eta in [0, 1]: 0 is the deterministic (DDIM-like) step, 1 draws all of the next step's noise afresh.
Unlike the SDE discretisations, the injected noise never exceeds the noise level sigma_next, so late
steps are not over-noised. The last step (sigma_next = 0) carries no noise and is always deterministic.

Unlike the SDE steps, the injected noise per step does not shrink with the step size, so with an exact
(posterior-mean) denoiser CPS keeps the data distribution only approximately, the better the smaller
eta: measured on a 2-D Gaussian mixture (tests/unit/samplers/test_marginals.py) eta 0.3 matches it,
eta 1 draws visibly too narrow samples, since x0_hat is a mean, not a draw. It is exact when x0_hat is
(a single data point).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from samplers.base import per_sample
from samplers.chain import ChainSampler
from samplers.flow_sde import FlowMatching


def cps_transition(
    x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [B, *L], std [B]) of one CPS step in fp32."""
    x, v, sigma, sigma_next = x.float(), v.float(), sigma.float(), sigma_next.float()
    s, s_next = per_sample(sigma, x), per_sample(sigma_next, x)
    x0, eps = x - s * v, x + (1 - s) * v
    mean = (1 - s_next) * x0 + s_next * math.cos(eta * math.pi / 2) * eps
    return mean, sigma_next * math.sin(eta * math.pi / 2)


class CPS(FlowMatching):
    max_noise_level = 1.0
    std_carries_sqrt_dt = False  # std = sigma_next sin(eta pi / 2) (ChainSampler.kl_std)

    def transition(self, x, out, sigmas, j, eta):
        return cps_transition(x, out, sigmas[:, j], sigmas[:, j + 1], eta)

    def can_be_stochastic(self, sigmas: torch.Tensor) -> torch.Tensor:
        return sigmas[1:] > 0  # std = sigma_next * sin(...)


@dataclass(kw_only=True)
class CPSSampler(ChainSampler):
    """Coefficients-preserving sampling on the plan's stochastic steps (knobs: conf/sampler/cps.yaml)."""

    kernel = CPS()
