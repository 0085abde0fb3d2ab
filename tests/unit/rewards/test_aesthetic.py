"""LaionAesthetic on a tiny random CLIP (768-dim projection, as ViT-L/14's) with a random head of the
published layer sizes saved like the LAION checkpoint, against the math done by hand."""

import pytest
import torch
from transformers import CLIPImageProcessorPil, CLIPModel

from rewards.aesthetic import LaionAesthetic
from tiny_reward_models import CLIP_SIZE, random_uint8_images, save_aesthetic_head, save_tiny_clip, to_pil


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("aesthetic")
    clip = save_tiny_clip(root / "clip", projection_dim=768)
    return {
        "clip": clip,
        "pth": save_aesthetic_head(root / "head.pth", seed=1),
        "safetensors": save_aesthetic_head(root / "head.safetensors", seed=1),
        "narrow": save_aesthetic_head(root / "narrow.pth", widths=(512, 64, 32, 16, 8, 1)),
    }


@pytest.fixture(scope="module")
def aesthetic(files):
    return LaionAesthetic(str(files["clip"]), str(files["pth"]), device="cpu")


def by_hand(files, images) -> torch.Tensor:
    """CLIP image features from transformers (processor + get_image_features), L2-normalised, through
    the five linear maps of the saved state dict with no activations in between."""
    model = CLIPModel.from_pretrained(files["clip"]).eval()
    pixels = CLIPImageProcessorPil.from_pretrained(files["clip"])(images=to_pil(images), return_tensors="pt")["pixel_values"]
    state = torch.load(files["pth"])
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels)
        x = getattr(features, "pooler_output", features)  # a ModelOutput in transformers 5, a tensor in 4
        x = x / x.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):
            x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    return x.squeeze(-1)


def test_score_is_the_published_head_on_the_normalised_clip_embedding(files, aesthetic):
    images = random_uint8_images(5, CLIP_SIZE, CLIP_SIZE, seed=3)
    expected = by_hand(files, images)
    got = aesthetic(images, [""] * 5)
    assert got.shape == (5,) and got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert expected.std() > 1e-4  # the images are told apart: a constant score would not pass by accident


def test_safetensors_head_gives_the_same_scores(files, aesthetic):
    images = random_uint8_images(3, CLIP_SIZE, CLIP_SIZE, seed=4)
    other = LaionAesthetic(str(files["clip"]), str(files["safetensors"]), device="cpu")
    torch.testing.assert_close(other(images), aesthetic(images))


def test_scores_do_not_depend_on_batching(files, aesthetic):
    images = random_uint8_images(5, 40, 56, seed=5)
    chunked = LaionAesthetic(str(files["clip"]), str(files["pth"]), batch_size=2, device="cpu")(images)
    alone = torch.cat([aesthetic(images[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(chunked, aesthetic(images), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(alone, aesthetic(images), atol=1e-6, rtol=1e-5)


def test_gradient_reaches_the_pixels(aesthetic):
    images = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(6), requires_grad=True)
    aesthetic(images).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_head_and_clip_widths_must_agree(files):
    with pytest.raises(ValueError, match="takes 512-dim embeddings but the CLIP.*makes 768-dim"):
        LaionAesthetic(str(files["clip"]), str(files["narrow"]), device="cpu")


def test_a_file_that_is_not_an_aesthetic_head_is_refused(files, tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"weight": torch.zeros(1, 768)}, bad)
    with pytest.raises(ValueError, match="not a LAION aesthetic head"):
        LaionAesthetic(str(files["clip"]), str(bad), device="cpu")


def test_missing_files_name_the_key_and_the_fix(files):
    with pytest.raises(FileNotFoundError, match=r"LaionAesthetic: head='/nonexistent/head.pth' is not a file.*improved-aesthetic-predictor"):
        LaionAesthetic(str(files["clip"]), "/nonexistent/head.pth", device="cpu")
    with pytest.raises(FileNotFoundError, match=r"LaionAesthetic: path='/nonexistent/clip' is not a folder"):
        LaionAesthetic("/nonexistent/clip", str(files["pth"]), device="cpu")
