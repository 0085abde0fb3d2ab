"""The contract every model-family adapter meets; the trainer and samplers see only this."""
from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

import torch


class Policy(Protocol):
    """A text-conditioned generator the trainer can roll out, score and update.

    Tensor conventions: latents [B, *latent_shape] fp32 at the sampler boundary; sigma [B] in [0, 1];
    images [B, 3, H, W] (or [B, F, 3, H, W] for video) in [0, 1].
    """

    transformer: torch.nn.Module  # the trainable network (LoRA-wrapped or full; a UNet for SD1.x/SDXL)
    # What predict() returns: "velocity" (flow matching: SD3, FLUX, Qwen-Image, Wan; the default when an
    # adapter does not say) or "epsilon" (SD1.x/SDXL). It must equal the sampler kernel's `prediction`.
    prediction: str
    height: int  # default generation size (the loop and launch.sample read them)
    width: int
    device: torch.device

    def encode(self, prompts: list[str]) -> object: ...

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, cond: object, guidance_scale: float) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1]. Differentiable in the latents (reward backprop sends gradients
        through it); the decoder itself is frozen, so without latents that require grad no graph is kept."""
        ...

    def sigmas(self, num_steps: int) -> torch.Tensor: ...

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]: ...

    def reference(self) -> AbstractContextManager: ...

    def trainable_state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def save_lora(self, out_dir: str | Path) -> Path:
        """Write the trained LoRA in diffusers' format into out_dir (pytorch_lora_weights.safetensors with the
        LoraConfig as metadata, so rank/alpha come back): <Pipeline>.from_pretrained(base).load_lora_weights(out_dir)
        then computes what this policy computes. Returns out_dir. Raises ValueError for a full fine-tune
        (no adapter; name merge=true)."""
        ...

    def save_merged(self, out_dir: str | Path) -> Path:
        """Write a complete diffusers folder into out_dir (new or empty): the base folder's other components
        and the trained network (LoRA merged in, or the full fine-tune), so <Pipeline>.from_pretrained(out_dir)
        loads the trained model. Does not modify the policy. Returns out_dir."""
        ...
