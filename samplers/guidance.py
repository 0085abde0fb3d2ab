"""Differentiable rewards of the clean prediction, for reward-gradient guidance of a rollout.

A guidance reward is any callable ``(x0_hat [B, *L] fp32 latents, sigma [B]) -> [B]`` that autograd
can differentiate with respect to x0_hat (a process reward model, or an image reward behind a
differentiable decoder). The sampler adds ``reward_guidance_scale * (sigma_j - sigma_{j+1}) *
grad R(x0_hat_j)`` to every step's mean (Euphonium, "process reward gradient guided stochastic
dynamics"); see samplers/chain.py.
"""
from __future__ import annotations

import torch


class LatentTarget:
    """R(x0) = -mean((x0 - target)^2): pulls every element of the clean prediction toward ``target``.

    A closed-form stand-in for a process reward: its gradient -2 (x0 - target) / numel is known, which
    the tests use; on the pixel-space toy, target 1 asks for white images.
    """

    def __init__(self, target: float = 1.0):
        self.target = float(target)

    def __call__(self, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return -((x0 - self.target) ** 2).flatten(1).mean(1)
