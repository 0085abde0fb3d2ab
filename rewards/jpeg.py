"""DDPO's JPEG (in)compressibility reward: the size of the image saved as a JPEG."""

from __future__ import annotations

import io

import torch
from PIL import Image


class JpegCompressibility:
    """reward = sign * (JPEG size in kilobytes, 1 kB = 1000 bytes as in DDPO).

    sign=-1 rewards compressible images (DDPO "compressibility"), sign=+1 incompressible ones.
    quality: PIL JPEG quality in [1, 100]. Raises ValueError for anything else or a sign other
    than +-1.
    """

    input_kind = "pixels"
    differentiable = False

    def __init__(self, quality: int = 95, sign: float = -1.0) -> None:
        if sign not in (-1.0, 1.0):
            raise ValueError(f"sign must be +1 (incompressibility) or -1 (compressibility), got {sign}")
        if not 1 <= quality <= 100:
            raise ValueError(f"quality must be in [1, 100], got {quality}")
        self.quality = int(quality)
        self.sign = float(sign)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata=None) -> dict[str, torch.Tensor]:
        """Encode images [B, 3, H, W] (float in [0, 1]); prompts and metadata are ignored.

        Returns float32 [B] tensors on images.device: "jpeg_kb" (size) and "reward" (sign * size).
        """
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be float [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        # Clamp because decoders overshoot [0, 1] slightly; uint8 is what a saved image holds.
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
        sizes = []
        for img in pixels:
            buffer = io.BytesIO()
            Image.fromarray(img).save(buffer, format="JPEG", quality=self.quality)
            sizes.append(buffer.tell() / 1000)
        kb = torch.tensor(sizes, dtype=torch.float32, device=images.device)
        return {"reward": self.sign * kb, "jpeg_kb": kb}
