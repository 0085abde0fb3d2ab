"""Differentiable rewards of the clean prediction, for reward-gradient guidance of a rollout and as
process rewards (algorithm=dual_grpo).

A guidance reward is any callable ``(x0_hat [B, *L] fp32 latents, sigma [B], prompt_ids [B] or None) -> [B]``
that autograd can differentiate with respect to x0_hat. ``prompt_ids`` index the run's prompt table; a
reward that reads prompts or decodes latents defines ``bind(policy, prompts)``, which the trainer calls
with the policy and that table before the first rollout. The sampler adds ``reward_guidance_scale *
(sigma_j - sigma_{j+1}) * grad R(x0_hat_j)`` to every step's mean (Euphonium, "process reward gradient
guided stochastic dynamics"); see samplers/chain.py.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch


class LatentTarget:
    """R(x0) = -mean((x0 - target)^2): pulls every element of the clean prediction toward ``target``.

    A closed-form stand-in for a process reward: its gradient -2 (x0 - target) / numel is known, which
    the tests use; on the pixel-space toy, target 1 asks for white images. Reads no prompt.
    """

    def __init__(self, target: float = 1.0):
        self.target = float(target)

    def __call__(self, x0: torch.Tensor, sigma: torch.Tensor, prompt_ids: torch.Tensor | None = None) -> torch.Tensor:
        return -((x0 - self.target) ** 2).flatten(1).mean(1)


class DecodedReward:
    """R(x0) = reward(policy.decode(x0), prompts[prompt_ids]): a differentiable image reward of the decoded
    clean prediction, prompt-aware (e.g. the digits classifier's probability of the digit each prompt
    asks for, or CLIPScore), through the policy's differentiable decode.

    Args:
      reward: an image reward with ``differentiable = True``, or its config ({_target_: ...}).
      log: use log(max(R, 1e-6)) (for probabilities: a gradient that does not vanish where R is small).
    """

    def __init__(self, reward, log: bool = False):
        if isinstance(reward, Mapping):
            from hydra.utils import instantiate

            reward = instantiate(dict(reward))
        if not getattr(reward, "differentiable", False):
            raise ValueError(f"DecodedReward needs a differentiable image reward; {type(reward).__name__} says it is "
                             "not (for the digits reward use component=prob)")
        self.reward, self.log = reward, bool(log)
        self.policy, self.prompts = None, None

    def bind(self, policy, prompts: list[str]) -> None:
        """The policy whose ``decode`` maps latents to images, and the prompt table prompt ids index."""
        self.policy, self.prompts = policy, list(prompts)

    def __call__(self, x0: torch.Tensor, sigma: torch.Tensor, prompt_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.policy is None:
            raise RuntimeError("DecodedReward is not bound to a policy and prompts: call bind(policy, prompts) (the "
                               "trainer does this for sampler.reward_guidance and algorithm.process_reward)")
        if prompt_ids is None:
            raise ValueError("DecodedReward scores against each sample's prompt: it needs the samples' prompt ids")
        out = self.reward(self.policy.decode(x0), [self.prompts[int(p)] for p in prompt_ids])
        r = (out["reward"] if isinstance(out, dict) else out).float().reshape(-1)
        return torch.log(r.clamp_min(1e-6)) if self.log else r
