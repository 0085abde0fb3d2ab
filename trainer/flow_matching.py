"""The rectified-flow training loss (SD3's objective), used to pre-train the toy and for SFT-style terms."""
from __future__ import annotations

from typing import Callable

import torch


def flow_matching_loss(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor, generator: torch.Generator,
    t_sampling: str = "uniform",
) -> torch.Tensor:
    """E ||v(x_t, t) - (noise - x0)||^2 with x_t = (1 - t) x0 + t noise.

    Args:
      predict: (x_t [B, *L], sigma [B]) -> velocity [B, *L].
      x0: clean samples [B, *L] (pixels in [-1, 1] for the pixel-space toy, else VAE latents).
      generator: CPU generator for the noise and the times (explicit, so runs are reproducible).
      t_sampling: "uniform" (rectified flow) or "logit_normal" (SD3: favours mid noise; at small
        resolutions it starves the high-noise steps where the layout is decided).
    Returns: scalar fp32 loss.
    """
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    if t_sampling == "uniform":
        t = torch.rand(b, generator=generator).to(x0.device)
    elif t_sampling == "logit_normal":
        t = torch.sigmoid(torch.randn(b, generator=generator)).to(x0.device)
    else:
        raise ValueError(f"t_sampling must be 'uniform' or 'logit_normal', got {t_sampling!r}")
    tt = t.reshape(-1, *([1] * (x0.dim() - 1)))
    x_t = (1 - tt) * x0 + tt * noise
    v = predict(x_t, t).float()
    return torch.nn.functional.mse_loss(v, (noise - x0).float())
