"""Image statistics as differentiable rewards and as reward-hacking monitors.

Optimising a learned reward tends to push images towards extremes that no prompt asked for:
over-saturated colour, blown-out or crushed brightness, harsh contrast, high-frequency texture
(which also defeats JPEG compressibility). `ImageStatistic` measures one such property per image,
in pure torch, so it can be logged beside the trained reward (weight 0) or optimised directly.

Luma is BT.601 (Y' = 0.299 R' + 0.587 G' + 0.114 B' on the gamma-encoded values), what JPEG and
PIL's "L" mode use, so numbers match what a saved image holds.
"""

from __future__ import annotations

import torch

LUMA_WEIGHTS = (0.299, 0.587, 0.114)
STATISTICS = ("brightness", "saturation", "contrast", "high_frequency")
# Guards the two divisions by values that are exactly 0 on black pixels / flat images: far below a
# single 8-bit step squared (1/255^2 ~ 1.5e-5), so it changes no real image's value.
EPS = 1e-12


def luma(images: torch.Tensor) -> torch.Tensor:
    """BT.601 luma [B, H, W] of images [B, 3, H, W], in the images' range."""
    weights = images.new_tensor(LUMA_WEIGHTS)
    return torch.einsum("bchw,c->bhw", images, weights)


def brightness(images: torch.Tensor) -> torch.Tensor:
    """Mean luma [B] in [0, 1]."""
    return luma(images).mean(dim=(1, 2))


def saturation(images: torch.Tensor) -> torch.Tensor:
    """Mean HSV saturation [B] in [0, 1]: per pixel (max - min) / max over R, G, B, 0 for black."""
    high = images.amax(dim=1)
    low = images.amin(dim=1)
    # where() rather than a clamp alone: a black pixel is unsaturated by definition, and its
    # gradient must be 0, not (max - min) / EPS.
    per_pixel = torch.where(high > EPS, (high - low) / high.clamp_min(EPS), torch.zeros_like(high))
    return per_pixel.mean(dim=(1, 2))


def contrast(images: torch.Tensor) -> torch.Tensor:
    """RMS contrast [B] in [0, 0.5]: the population standard deviation of luma over the pixels."""
    y = luma(images)
    # Through the variance with a floor, not torch.std: sqrt's gradient at 0 (a flat image) is inf.
    variance = (y - y.mean(dim=(1, 2), keepdim=True)).square().mean(dim=(1, 2))
    return variance.clamp_min(EPS).sqrt() * (variance > EPS)


def radial_frequency(height: int, width: int, device=None) -> torch.Tensor:
    """|f| [H, W] in cycles per pixel (0 .. sqrt(2)/2) of each bin of a 2-D DFT of that size."""
    fy = torch.fft.fftfreq(height, device=device)[:, None]
    fx = torch.fft.fftfreq(width, device=device)[None, :]
    return (fy.square() + fx.square()).sqrt()


def high_frequency(images: torch.Tensor, cutoff: float = 0.25) -> torch.Tensor:
    """Share [B] in [0, 1] of luma's non-DC spectral energy at radial frequency > cutoff (cycles/pixel).

    By Parseval the denominator is H*W times the sum of squared deviations from the mean, so the
    share does not depend on brightness or on a contrast scale. A flat image (no energy) gives 0.
    """
    y = luma(images)
    power = torch.fft.fft2(y).abs().square()  # [B, H, W]
    f = radial_frequency(y.shape[-2], y.shape[-1], device=y.device)
    high = (power * (f > cutoff)).sum(dim=(1, 2))
    total = (power * (f > 0)).sum(dim=(1, 2))  # f == 0 only at the DC bin
    return torch.where(total > EPS, high / total.clamp_min(EPS), torch.zeros_like(total))


class ImageStatistic:
    """One image statistic as a reward: sign * stat, or -(stat - target)^2 when target is given.

    statistic: one of STATISTICS (see the functions of the same name; all in [0, 1]).
    sign: +1 rewards more of the statistic, -1 less; must stay 1 when target is set.
    target: reward closeness to this value instead (e.g. brightness 0.5: neither dark nor blown out).
    cutoff: for "high_frequency" only, in cycles per pixel in (0, sqrt(2)/2); 0.25 is half the
      Nyquist frequency. Raises ValueError when set for another statistic (it would be ignored).

    Differentiable: gradients flow to the pixels (except where clamped outside [0, 1]).
    Returns float32 [B] tensors on images.device: "reward" and the raw statistic under its name.
    """

    input_kind = "pixels"
    differentiable = True

    def __init__(self, statistic: str, sign: float = 1.0, target: float | None = None, cutoff: float | None = None) -> None:
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
        if sign not in (-1.0, 1.0):
            raise ValueError(f"sign must be +1 or -1, got {sign}")
        if target is not None and sign != 1.0:
            raise ValueError(f"give either sign (got {sign}) or target (got {target}), not both: the reward with a target is -(stat - target)^2")
        if cutoff is not None and statistic != "high_frequency":
            raise ValueError(f"cutoff only applies to statistic='high_frequency', not {statistic!r}")
        if cutoff is not None and not 0 < cutoff < 2**-0.5:
            raise ValueError(f"cutoff must be in (0, sqrt(2)/2) cycles per pixel, got {cutoff}")
        self.statistic = statistic
        self.sign = float(sign)
        self.target = None if target is None else float(target)
        self.cutoff = 0.25 if cutoff is None else float(cutoff)

    def measure(self, images: torch.Tensor) -> torch.Tensor:
        """The statistic [B] of images [B, 3, H, W] in [0, 1], differentiable w.r.t. the images."""
        if self.statistic == "high_frequency":
            return high_frequency(images, self.cutoff)
        return {"brightness": brightness, "saturation": saturation, "contrast": contrast}[self.statistic](images)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata=None) -> dict[str, torch.Tensor]:
        """Score images [B, 3, H, W] (float in [0, 1]); prompts and metadata are ignored."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be float [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        # Clamp because decoders overshoot [0, 1] slightly; float32 because fft2 and the small
        # differences in saturation lose too much in half precision.
        stat = self.measure(images.float().clamp(0, 1))
        reward = self.sign * stat if self.target is None else -(stat - self.target).square()
        return {"reward": reward, self.statistic: stat}
