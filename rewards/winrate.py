"""Pairwise win rate within the group (Pref-GRPO, Wang et al. 2025, "Pref-GRPO: Pairwise Preference
Reward-based GRPO for Stable Text-to-Image Reinforcement Learning").

A pointwise reward's small score gaps get blown up by the group normalisation, which rewards tiny,
hackable differences. Pref-GRPO instead scores each sample by how often a pairwise preference model
prefers it over the other samples of its prompt: r_i = mean_{j != i} P(i beats j), in [0, 1].

A preference model is any object with ``preference(images [n, 3, H, W], prompt) -> [n, n]`` whose
entry (i, j) is P(i beats j) (so P + P.T = 1 off the diagonal). Shipped: ``ScalarPreference``, the
Bradley-Terry preference induced by a pointwise reward (sigmoid of the score gap / temperature).
"""
from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig


def _built(spec):
    """A config node is instantiated; an object (Hydra already built nested ``_target_`` nodes) is kept."""
    if isinstance(spec, (dict, DictConfig)):
        return instantiate({k: v for k, v in dict(spec).items() if k not in ("weight", "role")})
    return spec


class ScalarPreference:
    """P(i beats j) = sigmoid((r_i - r_j) / temperature) for a pointwise reward r (Bradley-Terry)."""

    def __init__(self, reward, temperature: float = 0.1):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.reward, self.temperature = _built(reward), float(temperature)

    def preference(self, images: torch.Tensor, prompt: str) -> torch.Tensor:
        out = self.reward(images, [prompt] * len(images))
        r = (out["reward"] if isinstance(out, dict) else out).float().reshape(-1).cpu()
        return torch.sigmoid((r[:, None] - r[None, :]) / self.temperature)


class WinRate:
    """Reward = win rate of each sample against the rest of its group under ``judge``.

    Groups come from ``metadata[i]["prompt_id"]`` (the trainer passes it); every group must be whole
    in the batch (trainer/config.py checks that groups do not span ranks when a win-rate reward is
    configured). A sample alone with its prompt (evaluation draws one per prompt) scores NaN, which
    the metrics skip. Components: "win_rate" (= reward) and "pref_margin" (mean |P - 0.5| over pairs: how
    decided the judge is; near 0 means the comparisons carry little signal).
    """

    input_kind = "pixels"
    differentiable = False
    needs_whole_groups = True

    def __init__(self, judge):
        self.judge = _built(judge)
        if not hasattr(self.judge, "preference"):
            raise TypeError(f"judge {type(self.judge).__name__} has no preference(images, prompt) method")

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> dict:
        if metadata is None or any("prompt_id" not in m for m in metadata):
            raise ValueError("WinRate needs metadata[i]['prompt_id'] to know each sample's group")
        ids = torch.tensor([int(m["prompt_id"]) for m in metadata])
        win = torch.full((len(prompts),), float("nan"))
        margin = torch.full((len(prompts),), float("nan"))
        for pid in ids.unique().tolist():
            idx = (ids == pid).nonzero().flatten()
            if len(idx) < 2:
                continue  # nothing to compare with (evaluation draws one sample per prompt): NaN, not logged
            p = self.judge.preference(images[idx], prompts[int(idx[0])]).float()
            off = ~torch.eye(len(idx), dtype=torch.bool)
            win[idx] = (p * off).sum(1) / (len(idx) - 1)
            margin[idx] = ((p - 0.5).abs() * off).sum(1) / (len(idx) - 1)
        return {"reward": win, "win_rate": win, "pref_margin": margin}
