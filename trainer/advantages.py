"""Group-relative advantages (GRPO): each sample's reward against the others drawn for its prompt."""
from __future__ import annotations

import torch

from trainer.distributed import all_gather_cat


def group_moments(values: torch.Tensor, prompt_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group population mean [G] and std [G] of ``values`` [N] (fp32), and each sample's group index [N].

    Groups are the distinct ``prompt_ids`` in sorted order; a group is the whole population of its
    prompt's samples, hence the population (unbiased=False) std.
    """
    values = values.float()
    uniq, inverse = torch.unique(prompt_ids, return_inverse=True)
    counts = torch.zeros(len(uniq)).index_add_(0, inverse, torch.ones_like(values))
    means = torch.zeros(len(uniq)).index_add_(0, inverse, values) / counts
    var = torch.zeros(len(uniq)).index_add_(0, inverse, (values - means[inverse]) ** 2) / counts
    return means, var.sqrt(), inverse


def group_advantages(rewards: torch.Tensor, prompt_ids: torch.Tensor, std_scope: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """(r - mean of its prompt's group) / std.

    Args:
      rewards: [N] fp32; prompt_ids: [N] long (samples of one prompt share an id).
      std_scope: "group" divides by the group's std (Flow-GRPO); "global" by the batch std
        (less noisy when a group's rewards are nearly equal).
      eps: keeps an all-equal group at advantage 0 instead of 0/0.
    Returns: [N] fp32.
    """
    rewards = rewards.float()
    means, stds, inverse = group_moments(rewards, prompt_ids)
    centered = rewards - means[inverse]
    if std_scope == "group":
        std = stds[inverse]
    elif std_scope == "global":
        std = rewards.std(unbiased=False).expand_as(rewards)
    else:
        raise ValueError(f"std_scope must be 'group' or 'global', got {std_scope!r}")
    return centered / (std + eps)


def distributed_advantages(
    per_reward: dict[str, torch.Tensor], weights: dict[str, float], regularizers: set[str], prompt_ids: torch.Tensor,
    rank: int, aggregator, std_scope: str = "group",
) -> tuple[torch.Tensor, dict[str, float]]:
    """This rank's advantages from every reward's scores, groups possibly spanning ranks.

    One all-gather of all rewards [K, N_local] (rank order = global sample order); every rank runs the
    same ``aggregator`` (rewards/aggregate.py) over the trained rewards (weight != 0, not
    regularisers), then adds each regulariser as w * (r - its group mean): a penalty that shifts
    advantages in its own units, never rescaled by the group's spread. Returns (adv [N_local], stats).
    """
    names = sorted(per_reward)
    local = torch.stack([per_reward[n].float().cpu().reshape(-1) for n in names])  # [K, N_local]
    gathered = all_gather_cat(local.T.contiguous()).T  # [K, N]
    all_p = all_gather_cat(prompt_ids.cpu())
    full = dict(zip(names, gathered))
    trained = {n: full[n] for n in per_reward if weights[n] != 0 and n not in regularizers}  # ensemble order
    adv, stats = aggregator(trained, weights, all_p, std_scope)
    for name in regularizers:
        if weights[name] != 0:
            means, _, inverse = group_moments(full[name], all_p)
            adv = adv + weights[name] * (full[name] - means[inverse])
    n = prompt_ids.shape[0]
    return adv[rank * n : (rank + 1) * n].to(prompt_ids.device), stats

