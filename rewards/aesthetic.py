"""LAION aesthetic score: a small MLP on the normalised CLIP ViT-L/14 image embedding.

The "improved aesthetic predictor" (christophschuhmann/improved-aesthetic-predictor, the reward of
DDPO, AlignProp and DRaFT) maps OpenAI CLIP ViT-L/14's unit-norm image embedding through
Linear(768, 1024) - Dropout - Linear(1024, 128) - Dropout - Linear(128, 64) - Dropout -
Linear(64, 16) - Linear(16, 1), with no activations, to a 1-10 rating (sac+logos+ava1-l14-linearMSE.pth).
The head is rebuilt here with the same module indices (layers.0/2/4/6/7), so the published state dict
loads strictly; layer widths are read from the file, so heads trained on other CLIP widths load too.
"""

from __future__ import annotations

import torch
from torch import nn

from rewards.clip_score import embed_images, grad_context, load_clip
from rewards.local_weights import load_state_dict, require_file, resolve_device, resolve_dtype

FETCH_HEAD = (
    "e.g. `wget https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
    "sac+logos+ava1-l14-linearMSE.pth -O /models/sac+logos+ava1-l14-linearMSE.pth`"
)
LINEAR_INDICES = (0, 2, 4, 6, 7)  # Linear layers of the published nn.Sequential; the gaps were Dropouts


def aesthetic_head(state: dict[str, torch.Tensor]) -> nn.Sequential:
    """The published MLP with the widths in `state` (keys layers.{0,2,4,6,7}.{weight,bias}), loaded
    strictly, in eval mode. ValueError when the keys or shapes do not form that chain."""
    keys = sorted(state)
    expected = sorted(f"layers.{i}.{p}" for i in LINEAR_INDICES for p in ("weight", "bias"))
    if keys != expected:
        raise ValueError(f"not a LAION aesthetic head: expected keys {expected}, got {keys}")
    widths = [state["layers.0.weight"].shape[1]] + [state[f"layers.{i}.weight"].shape[0] for i in LINEAR_INDICES]
    if widths[-1] != 1:
        raise ValueError(f"the head's last layer must output 1 score, got {widths[-1]}")
    linears = [nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])]
    # Dropout positions as published (their p is irrelevant in eval mode) so indices match the file.
    layers = nn.Sequential(linears[0], nn.Dropout(0.2), linears[1], nn.Dropout(0.2), linears[2], nn.Dropout(0.1), linears[3], linears[4])
    # Strict: a width mismatch between consecutive layers surfaces here.
    layers.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()}, strict=True)
    return layers.eval()


class LaionAesthetic:
    """reward = LAION aesthetic MLP(unit-norm CLIP image embedding), ~1-10 for the published head.

    path: local folder of a transformers CLIP model (openai/clip-vit-large-patch14 for the published head).
    head: the MLP's state dict, .pth/.pt (read with weights_only) or .safetensors.
    processor_path: folder with preprocessor_config.json when `path` lacks it (default: path).
    device, dtype, batch_size: as in ClipScore; the head always runs in float32 (it is tiny).

    __call__ returns a float32 [B] tensor on images.device (prompts and metadata are ignored).
    Differentiable in the pixels when the images require grad; otherwise runs under no_grad.
    """

    input_kind = "pixels"
    differentiable = True

    def __init__(self, path: str, head: str, processor_path: str | None = None, device: str = "auto",
                 dtype: str = "float32", batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        owner = type(self).__name__
        head_file = require_file(head, owner, "head", FETCH_HEAD)  # checked before the big model loads
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        model, self.preprocess, _ = load_clip(path, processor_path, owner)
        # Only the image tower is used: drop the text tower (~120M parameters for ViT-L/14).
        del model.text_model, model.text_projection
        self.model = model.to(device=self.device, dtype=self.dtype)
        self.head = aesthetic_head(load_state_dict(head_file)).to(self.device).requires_grad_(False)
        if self.head[0].in_features != model.config.projection_dim:
            raise ValueError(
                f"{owner}: head={head!r} takes {self.head[0].in_features}-dim embeddings but the CLIP in path={path!r} "
                f"makes {model.config.projection_dim}-dim ones; the published head needs openai/clip-vit-large-patch14"
            )
        self.batch_size = int(batch_size)

    def __call__(self, images: torch.Tensor, prompts: list[str] | None = None, metadata=None) -> torch.Tensor:
        """Score images [B, 3, H, W] (float in [0, 1]) -> float32 [B] on images.device."""
        with grad_context(images):
            embeds = embed_images(self.model, self.preprocess, images, self.batch_size, self.device, self.dtype)
            return self.head(embeds).squeeze(-1).to(images.device)
