"""The torch preprocessing the learned rewards use against transformers' own (PIL) image processors."""

import json

import pytest
import torch
from transformers import BitImageProcessorPil, CLIPImageProcessorPil

from rewards.image_preprocess import ImagePreprocess, resized_shape
from tiny_reward_models import random_uint8_images, to_pil

# PIL resizes 8-bit images in two passes and rounds to 8 bits after each: the first rounding (<= 0.5/255)
# goes through the second pass's kernel (sum of |weights| <= 1.25 for PIL's cubic), the second adds
# 0.5/255; normalising divides by std >= 0.22. About 0.02 in normalised units, plus float noise.
PIL_ROUNDING = (1.25 * 0.5 + 0.5) / 255 / 0.22 + 1e-4


def processors():
    clip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    dino = BitImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                                image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    square = CLIPImageProcessorPil(size={"height": 24, "width": 40}, do_center_crop=False, resample=2)  # bilinear
    return {"clip": clip, "dino": dino, "square_bilinear": square}


@pytest.mark.parametrize("name", ["clip", "dino", "square_bilinear"])
@pytest.mark.parametrize("shape", [(32, 32), (64, 80), (90, 50), (20, 27), (33, 31)], ids=str)
def test_matches_the_transformers_processor(tmp_path, name, shape):
    processor = processors()[name]
    processor.save_pretrained(tmp_path)
    images = random_uint8_images(2, *shape, seed=sum(shape))
    expected = processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
    got = ImagePreprocess.from_folder(tmp_path)(images)
    assert got.shape == expected.shape  # resize geometry and crop offsets exactly as transformers
    torch.testing.assert_close(got, expected, atol=PIL_ROUNDING, rtol=0)


def test_old_style_int_sizes_read_as_shortest_edge_and_square_crop(tmp_path):
    # openai/clip-vit-large-patch14's preprocessor_config.json: "size": 224, "crop_size": 224.
    config = {"do_resize": True, "size": 32, "do_center_crop": True, "crop_size": 32, "resample": 3, "do_normalize": True,
              "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    preprocess = ImagePreprocess.from_folder(tmp_path)
    assert preprocess.size == {"shortest_edge": 32} and preprocess.crop == (32, 32)
    assert preprocess(torch.rand(1, 3, 48, 64)).shape == (1, 3, 32, 32)


def test_resized_shape_follows_transformers_rounding():
    assert resized_shape(90, 50, {"shortest_edge": 36}) == (64, 36)  # int(36 * 90 / 50) = 64 (64.8 floored)
    assert resized_shape(50, 90, {"shortest_edge": 36}) == (36, 64)
    assert resized_shape(7, 9, {"height": 24, "width": 40}) == (24, 40)


def test_gradients_reach_every_kept_pixel_through_the_resize():
    preprocess = ImagePreprocess(mean=[0.5] * 3, std=[0.25] * 3, size={"shortest_edge": 16}, crop=(16, 16))
    images = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.1
    images.requires_grad_(True)
    preprocess(images).sum().backward()
    # Shrinking 24 -> 16 with antialiasing touches every input pixel; the crop keeps all of them.
    assert images.grad is not None and (images.grad != 0).float().mean() > 0.99


def test_missing_processor_config_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json is missing.*processor_path"):
        ImagePreprocess.from_folder(tmp_path)
