"""Group-relative advantages (GRPO): each sample's reward against the others drawn for its prompt."""
from __future__ import annotations

import torch

from trainer.distributed import all_gather_cat


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
    uniq, inverse = torch.unique(prompt_ids, return_inverse=True)
    counts = torch.zeros(len(uniq)).index_add_(0, inverse, torch.ones_like(rewards))
    means = torch.zeros(len(uniq)).index_add_(0, inverse, rewards) / counts
    centered = rewards - means[inverse]
    if std_scope == "group":
        # Population std within each group (unbiased=False), as a group is the whole population.
        var = torch.zeros(len(uniq)).index_add_(0, inverse, centered**2) / counts
        std = var.sqrt()[inverse]
    elif std_scope == "global":
        std = rewards.std(unbiased=False).expand_as(rewards)
    else:
        raise ValueError(f"std_scope must be 'group' or 'global', got {std_scope!r}")
    return centered / (std + eps)


def distributed_group_advantages(
    rewards: torch.Tensor, prompt_ids: torch.Tensor, rank: int, std_scope: str = "group"
) -> torch.Tensor:
    """Advantages for this rank's samples when a prompt's group may span ranks.

    Every rank gathers all rewards and prompt ids (rank order = global sample order), computes the
    same global advantages, and keeps its own slice. Requires equal sample counts per rank.
    """
    all_r = all_gather_cat(rewards.float().cpu())
    all_p = all_gather_cat(prompt_ids.cpu())
    adv = group_advantages(all_r, all_p, std_scope)
    n = rewards.shape[0]
    return adv[rank * n : (rank + 1) * n].to(rewards.device)
