"""Image statistics against values worked out by hand, against independent implementations (PIL's
luma, colorsys' HSV), and against finite differences for their gradients."""

import colorsys
import math

import numpy as np
import pytest
import torch
from PIL import Image

from rewards.image_stats import STATISTICS, ImageStatistic, brightness, contrast, high_frequency, saturation


def gray(values: torch.Tensor) -> torch.Tensor:
    """[B, H, W] -> [B, 3, H, W] with equal channels: luma is then the value (BT.601 weights sum to 1)."""
    return values[:, None].expand(-1, 3, -1, -1).contiguous()


def constant(rgb, size=(8, 8)) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float64)[None, :, None, None].expand(1, 3, *size).contiguous()


def checkerboard(low: float, high: float, size=(8, 8)) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    return gray(torch.where((x + y) % 2 == 0, high, low).double()[None])


def waves(height: int, width: int, low: float, nyquist: float, diagonal: float) -> torch.Tensor:
    """0.5 + low*cos(2 pi x/8) + nyquist*(-1)^x + diagonal*cos(2 pi (x+y)/4), as [1, 3, H, W].

    Radial frequencies 0.125, 0.5 and sqrt(2)/4 ~ 0.354 cycles/pixel. The three are orthogonal, so by
    Parseval their energies are H*W times low^2/2, nyquist^2 and diagonal^2/2.
    """
    y, x = torch.meshgrid(torch.arange(height).double(), torch.arange(width).double(), indexing="ij")
    img = 0.5 + low * torch.cos(2 * math.pi * x / 8) + nyquist * (-1) ** x + diagonal * torch.cos(2 * math.pi * (x + y) / 4)
    return gray(img[None])


# --- each statistic against ground truth --------------------------------------------------------


def test_constant_images():
    images = torch.cat([constant((0.5, 0.5, 0.5)), constant((1.0, 0.5, 0.0)), constant((0.8, 0.4, 0.2)), constant((0.0, 0.0, 0.0))])
    torch.testing.assert_close(brightness(images), torch.tensor([0.5, 0.299 + 0.587 * 0.5, 0.299 * 0.8 + 0.587 * 0.4 + 0.114 * 0.2, 0.0], dtype=torch.float64))
    torch.testing.assert_close(saturation(images), torch.tensor([0.0, 1.0, 0.75, 0.0], dtype=torch.float64))  # (max-min)/max
    torch.testing.assert_close(contrast(images), torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(high_frequency(images), torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("low, high, size", [(0.0, 1.0, (8, 8)), (0.2, 0.6, (6, 10))])
def test_checkerboards(low, high, size):
    image = checkerboard(low, high, size)
    assert brightness(image).item() == pytest.approx((low + high) / 2)
    assert contrast(image).item() == pytest.approx((high - low) / 2)  # every pixel is |high - low| / 2 off the mean
    assert saturation(image).item() == 0.0
    # All of a checkerboard's non-DC energy sits at (0.5, 0.5) cycles/pixel, above any cutoff.
    assert high_frequency(image).item() == pytest.approx(1.0)


@pytest.mark.parametrize("size", [(16, 16), (8, 32)])
def test_high_frequency_share_is_the_parseval_energy_ratio(size):
    low, nyquist, diagonal = 0.2, 0.1, 0.15
    image = waves(*size, low, nyquist, diagonal)
    e_low, e_nyq, e_diag = low**2 / 2, nyquist**2, diagonal**2 / 2
    total = e_low + e_nyq + e_diag
    # cutoff 0.25: the diagonal wave (0.25 per axis, 0.354 radially) is high; a max-norm would miss it.
    assert high_frequency(image).item() == pytest.approx((e_nyq + e_diag) / total)
    assert high_frequency(image, cutoff=0.4).item() == pytest.approx(e_nyq / total)
    assert high_frequency(image, cutoff=0.1).item() == pytest.approx(1.0)
    # Independent of brightness and of contrast scale.
    assert high_frequency(0.5 * image + 0.1).item() == pytest.approx((e_nyq + e_diag) / total)


def test_brightness_matches_pil_luma():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(2, 12, 20, 3), dtype=np.uint8)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).double() / 255
    pil = np.array([np.asarray(Image.fromarray(p).convert("L"), dtype=np.float64) for p in pixels])  # BT.601, rounded
    np.testing.assert_allclose(brightness(images).numpy() * 255, pil.mean(axis=(1, 2)), atol=0.5)
    np.testing.assert_allclose(contrast(images).numpy() * 255, pil.std(axis=(1, 2)), atol=0.5)


def test_saturation_matches_colorsys():
    rng = np.random.default_rng(1)
    pixels = rng.random((2, 5, 7, 3))
    pixels[0, 0, 0] = 0.0  # a black pixel: saturation 0 by definition
    expected = np.array([[colorsys.rgb_to_hsv(*px)[1] for px in img.reshape(-1, 3)] for img in pixels]).mean(axis=1)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    np.testing.assert_allclose(saturation(images).numpy(), expected, rtol=1e-12)


# --- gradients -----------------------------------------------------------------------------------


@pytest.mark.parametrize("statistic", STATISTICS)
def test_gradients_match_finite_differences(statistic):
    images = (torch.rand(2, 3, 6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.8 + 0.1)
    measure = ImageStatistic(statistic).measure
    assert torch.autograd.gradcheck(measure, (images.requires_grad_(),))


@pytest.mark.parametrize("statistic", STATISTICS)
def test_reward_backpropagates_to_pixels(statistic):
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    ImageStatistic(statistic)(images, ["", ""])["reward"].sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


@pytest.mark.parametrize("statistic", STATISTICS)
def test_flat_and_black_images_have_finite_gradients(statistic):
    images = torch.cat([torch.full((1, 3, 8, 8), 0.5), torch.zeros(1, 3, 8, 8)]).requires_grad_()
    ImageStatistic(statistic)(images, ["", ""])["reward"].sum().backward()
    assert torch.isfinite(images.grad).all()


# --- the reward wrapper --------------------------------------------------------------------------


def test_sign_and_target():
    images = torch.cat([checkerboard(0.0, 1.0), constant((0.8, 0.4, 0.2))]).float()
    out = ImageStatistic("brightness")(images, ["", ""])
    assert set(out) == {"reward", "brightness"} and out["reward"].dtype == torch.float32 and out["reward"].shape == (2,)
    torch.testing.assert_close(out["reward"], out["brightness"])
    torch.testing.assert_close(ImageStatistic("brightness", sign=-1.0)(images, ["", ""])["reward"], -out["brightness"])
    targeted = ImageStatistic("brightness", target=0.5)(images, ["", ""])
    torch.testing.assert_close(targeted["reward"], torch.tensor([0.0, -((0.2392 + 0.2348 + 0.0228) - 0.5) ** 2]))
    assert ImageStatistic("contrast")(images, ["", ""])["contrast"][0].item() == pytest.approx(0.5)


def test_values_outside_unit_range_are_clamped():
    over = torch.full((1, 3, 4, 4), 1.2)
    assert ImageStatistic("brightness")(over, [""])["reward"].item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"statistic": "sharpness"},
        {"statistic": "brightness", "sign": 2.0},
        {"statistic": "brightness", "sign": -1.0, "target": 0.5},
        {"statistic": "contrast", "cutoff": 0.3},
        {"statistic": "high_frequency", "cutoff": 0.0},
        {"statistic": "high_frequency", "cutoff": 0.8},
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        ImageStatistic(**kwargs)


def test_bad_images_raise():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        ImageStatistic("brightness")(torch.ones(1, 1, 4, 4), [""])


def test_attributes():
    assert ImageStatistic.input_kind == "pixels" and ImageStatistic.differentiable is True
