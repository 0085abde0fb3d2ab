"""DDPO's JPEG (in)compressibility reward."""

import io

import pytest
import torch
from PIL import Image

from rewards.jpeg import JpegCompressibility


def _flat_and_noise():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand((1, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    return torch.cat([flat, noise])


def test_flat_image_is_more_compressible_than_noise():
    out = JpegCompressibility()(_flat_and_noise(), ["", ""])
    assert out["reward"].shape == (2,) and out["reward"].dtype == torch.float32
    assert out["reward"][0] > out["reward"][1]
    assert torch.equal(out["reward"], -out["jpeg_kb"])
    assert (out["jpeg_kb"] > 0).all()


def test_size_is_jpeg_bytes_over_1000():
    images = _flat_and_noise()
    kb = JpegCompressibility(quality=80)(images, ["", ""])["jpeg_kb"]
    buffer = io.BytesIO()
    pixels = (images[1] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=80)
    assert kb[1].item() == pytest.approx(len(buffer.getvalue()) / 1000)


def test_sign_flips_reward_and_quality_matters():
    images = _flat_and_noise()
    out = JpegCompressibility(sign=1.0)(images, ["", ""])
    assert out["reward"][1] > out["reward"][0]
    assert torch.equal(out["reward"], out["jpeg_kb"])
    low = JpegCompressibility(quality=10)(images, ["", ""])["jpeg_kb"]
    assert low[1] < out["jpeg_kb"][1]


@pytest.mark.parametrize("kwargs", [{"sign": 0.5}, {"sign": 0.0}, {"sign": -2.0}, {"quality": 0}, {"quality": 101}])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        JpegCompressibility(**kwargs)


def test_attributes():
    assert JpegCompressibility.input_kind == "pixels" and JpegCompressibility.differentiable is False
