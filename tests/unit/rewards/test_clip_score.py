"""ClipScore (CLIPScore / PickScore / HPS v2) on a tiny random CLIP saved as a transformers folder,
against the scores transformers' own CLIPModel, tokenizer and image processor give."""

import pytest
import torch
from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

from rewards.clip_score import ClipScore
from tiny_reward_models import CLIP_SIZE, random_uint8_images, save_tiny_clip, to_pil

PROMPTS = ["a red circle", "a photo of a cat", "a red circle", "zebra", "a very long prompt " * 20, "red"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def clip_score(clip_dir):
    return ClipScore(str(clip_dir), device="cpu")


def transformers_logits(folder, images, prompts) -> torch.Tensor:
    """diag(logits_per_image) = exp(logit_scale) * cos(image_i, text_i), by CLIPModel.forward on the
    processor's (PIL) pixels and the tokenizer's ids: PickScore's reference computation."""
    model = CLIPModel.from_pretrained(folder).eval()
    tokens = AutoTokenizer.from_pretrained(folder)(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    pixels = CLIPImageProcessorPil.from_pretrained(folder)(images=to_pil(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels).logits_per_image.diagonal()


@pytest.fixture(scope="module")
def images():
    # At the processor's size, so the reference path does no resampling (tested in test_image_preprocess).
    return random_uint8_images(len(PROMPTS), CLIP_SIZE, CLIP_SIZE, seed=0)


@pytest.fixture(scope="module")
def reference(clip_dir, images):
    logits = transformers_logits(clip_dir, images, PROMPTS)
    logit_scale = CLIPModel.from_pretrained(clip_dir).logit_scale.exp().item()
    return logits, logits / logit_scale, logit_scale


def test_clipscore_is_2_5_times_the_clamped_cosine_of_transformers_clip(clip_score, images, reference):
    _, cosine, _ = reference
    assert (cosine < 0).any() and (cosine > 0).any(), cosine  # both branches of max(cos, 0) are exercised
    out = clip_score(images, PROMPTS)
    torch.testing.assert_close(out["cosine"], cosine, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["reward"], 2.5 * cosine.clamp_min(0), atol=1e-5, rtol=1e-4)
    assert out["reward"].dtype == torch.float32 and not out["reward"].requires_grad


def test_pickscore_and_hps_scales(clip_dir, images, reference):
    logits, cosine, logit_scale = reference
    pick = ClipScore(str(clip_dir), scale="logit_scale", clamp_negative=False, device="cpu")
    assert pick.scale == pytest.approx(logit_scale)
    torch.testing.assert_close(pick(images, PROMPTS)["reward"], logits, atol=1e-4, rtol=1e-4)
    hps = ClipScore(str(clip_dir), scale=1.0, clamp_negative=False, device="cpu")
    torch.testing.assert_close(hps(images, PROMPTS)["reward"], cosine, atol=1e-5, rtol=1e-4)


def test_scores_do_not_depend_on_batching(clip_dir, clip_score, images):
    whole = clip_score(images, PROMPTS)["reward"]
    chunked = ClipScore(str(clip_dir), batch_size=4, device="cpu")(images, PROMPTS)["reward"]
    alone = torch.cat([clip_score(images[i : i + 1], PROMPTS[i : i + 1])["reward"] for i in range(len(PROMPTS))])
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(alone, whole, atol=1e-6, rtol=1e-5)


def test_gradient_reaches_the_pixels_and_matches_finite_differences(clip_score):
    # 48x40 input: the gradient also flows through the resize and crop.
    images = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1
    prompts = ["a photo of a cat", "a red circle"]
    x = images.clone().requires_grad_(True)
    clip_score(x, prompts)["cosine"].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    direction = torch.randn(images.shape, generator=torch.Generator().manual_seed(2)) * 0.01
    eps = 0.5
    plus = clip_score(images + eps * direction, prompts)["cosine"].sum()
    minus = clip_score(images - eps * direction, prompts)["cosine"].sum()
    numeric = (plus - minus) / (2 * eps)
    analytic = (x.grad * direction).sum()
    assert abs(numeric - analytic) < 0.02 * abs(analytic) + 1e-6, (numeric, analytic)


def test_bfloat16_scores_close_to_float32(clip_dir, clip_score, images):
    full = clip_score(images, PROMPTS)["cosine"]
    half = ClipScore(str(clip_dir), dtype="bfloat16", device="cpu")(images, PROMPTS)["cosine"]
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, atol=0.03, rtol=0)


def test_missing_folders_name_the_key_and_the_fix(tmp_path, clip_dir):
    with pytest.raises(FileNotFoundError, match=r"ClipScore: path='/nonexistent/clip' is not a folder.*hf download.*rewards\.<name>\.path="):
        ClipScore("/nonexistent/clip", device="cpu")
    with pytest.raises(FileNotFoundError, match=r"processor_path='/nonexistent/processor'"):
        ClipScore(str(clip_dir), processor_path="/nonexistent/processor", device="cpu")
    empty = tmp_path / "weights_only"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json is missing"):
        ClipScore(str(clip_dir), processor_path=str(empty), device="cpu")


def test_rejects_unknown_scale_and_mismatched_prompts(clip_dir, clip_score):
    with pytest.raises(ValueError, match="scale must be a number or 'logit_scale'"):
        ClipScore(str(clip_dir), scale="temperature", device="cpu")
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        clip_score(torch.rand(3, 3, 32, 32), ["a", "b"])
