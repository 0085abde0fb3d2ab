"""The rectified-flow training loss (SD3's objective), used to pre-train the toy and for SFT-style terms."""
from __future__ import annotations

from typing import Callable

import torch


def flow_matching_loss(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """E ||v(x_t, t) - (noise - x0)||^2 with x_t = (1 - t) x0 + t noise and logit-normal t.

    Args:
      predict: (x_t [B, *L], sigma [B]) -> velocity [B, *L].
      x0: clean samples [B, *L] (pixels in [-1, 1] for the pixel-space toy, else VAE latents).
      generator: CPU generator for the noise and the times (explicit, so runs are reproducible).
    Returns: scalar fp32 loss.
    """
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    # Logit-normal(0, 1) times, as SD3 trains: more weight on mid noise levels, where the
    # velocity is hardest to predict and matters most for sample quality.
    t = torch.sigmoid(torch.randn(b, generator=generator)).to(x0.device)
    tt = t.reshape(-1, *([1] * (x0.dim() - 1)))
    x_t = (1 - tt) * x0 + tt * noise
    v = predict(x_t, t).float()
    return torch.nn.functional.mse_loss(v, (noise - x0).float())
