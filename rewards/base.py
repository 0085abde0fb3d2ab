"""The Reward contract."""
from __future__ import annotations

from typing import Protocol

import torch


class Reward(Protocol):
    """Scores a batch of generated images against their prompts.

    ``__call__(images [B, 3, H, W] float in [0, 1], prompts: list[str], metadata: list[dict] | None)``
    returns a [B] float tensor, or a dict holding "reward" [B] plus any named components [B] (logged
    as ``reward/<name>/<component>``). ``input_kind`` says what the reward consumes ("pixels" here;
    adapters convert), ``differentiable`` whether gradients flow to the pixels.
    """

    input_kind: str
    differentiable: bool

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None): ...
