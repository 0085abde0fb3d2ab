"""The contract every model-family adapter meets; the trainer and samplers see only this."""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

import torch


class Policy(Protocol):
    """A text-conditioned generator the trainer can roll out, score and update.

    Tensor conventions: latents [B, *latent_shape] fp32 at the sampler boundary; sigma [B] in [0, 1];
    images [B, 3, H, W] (or [B, F, 3, H, W] for video) in [0, 1].
    """

    transformer: torch.nn.Module  # the trainable network (LoRA-wrapped or full)

    def encode(self, prompts: list[str]) -> object: ...

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, cond: object, guidance_scale: float) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def sigmas(self, num_steps: int) -> torch.Tensor: ...

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]: ...

    def reference(self) -> AbstractContextManager: ...

    def trainable_state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...
