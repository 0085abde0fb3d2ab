"""How several rewards become one advantage per sample (``aggregate=<name>``).

Every aggregator sees the whole step's batch (gathered across ranks, global sample order):
``per_reward`` name -> [N] raw scores of the trained rewards (weight != 0, not regularisers),
``weights`` name -> weight, ``prompt_ids`` [N] (a group = the samples of one prompt), and returns
(advantages [N] fp32, stats name -> float). Regulariser rewards are added afterwards by the trainer
(trainer/advantages.py), unnormalised, whatever the aggregator.
"""
from __future__ import annotations

import torch

from trainer.advantages import group_advantages, group_moments


class WeightedSum:
    """Group advantages of sum_i w_i r_i (Flow-GRPO's multi-reward setting). The default."""

    def __call__(self, per_reward, weights, prompt_ids, std_scope="group"):
        total = sum(weights[n] * r for n, r in per_reward.items())
        return group_advantages(total, prompt_ids, std_scope), {}


class AdvantageSum:
    """sum_i w_i * A_i with A_i the group advantage of reward i alone: each reward is normalised within
    its group first, so a reward with a large numeric range cannot drown the others (GDPO-style
    decoupled normalisation)."""

    def __call__(self, per_reward, weights, prompt_ids, std_scope="group"):
        adv = sum(weights[n] * group_advantages(r, prompt_ids, std_scope) for n, r in per_reward.items())
        return adv, {}


class Pareto:
    """Batch-wise Pareto selection (Parrot, Lee et al. 2024): within each group, only samples that no
    other sample of the group dominates on every trained reward keep their advantage (from the
    weighted sum); dominated samples get 0, so the update pushes toward the group's Pareto front.

    b dominates a when b >= a on every reward (weight-signed) and b > a on at least one.
    """

    def __call__(self, per_reward, weights, prompt_ids, std_scope="group"):
        total = sum(weights[n] * r for n, r in per_reward.items())
        adv = group_advantages(total, prompt_ids, std_scope)
        scores = torch.stack([torch.sign(torch.tensor(weights[n])) * r.float() for n, r in per_reward.items()], 1)  # [N, K]
        front = pareto_front(scores, prompt_ids)
        return adv * front, {"pareto_front_frac": float(front.float().mean())}


def pareto_front(scores: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
    """[N] bool: sample i is not dominated by any sample of its own group. scores [N, K], higher is better."""
    same = prompt_ids[:, None] == prompt_ids[None, :]  # [N, N]
    geq = (scores[None, :, :] >= scores[:, None, :]).all(-1)  # [i, j]: j >= i everywhere
    gt = (scores[None, :, :] > scores[:, None, :]).any(-1)  # [i, j]: j > i somewhere
    dominated = (same & geq & gt).any(1)
    return ~dominated


class UncertaintyWeighted:
    """Down-weight a reward where it is unsure (Ctrl-U's idea, uncertainty-aware reward weighting):
    for reward i in group g, u_ig = std of r_i within g / std of r_i over the batch; the group's
    weighted sum uses w_i * exp(-temperature * u_ig). A reward whose scores scatter across samples of
    one prompt far more than usual counts less there; temperature 0 is WeightedSum.
    """

    def __init__(self, temperature: float = 1.0, eps: float = 1e-6):
        if temperature < 0:
            raise ValueError(f"aggregate.temperature must be >= 0, got {temperature}")
        self.temperature, self.eps = temperature, eps

    def __call__(self, per_reward, weights, prompt_ids, std_scope="group"):
        total = torch.zeros(len(prompt_ids))
        stats = {}
        for name, r in per_reward.items():
            r = r.float()
            _, stds, inverse = group_moments(r, prompt_ids)
            u = stds / (r.std(unbiased=False) + self.eps)
            c = torch.exp(-self.temperature * u)  # [groups]
            total = total + weights[name] * c[inverse] * r
            stats[f"uncertainty/{name}"] = float(u.mean())
        return group_advantages(total, prompt_ids, std_scope), stats
