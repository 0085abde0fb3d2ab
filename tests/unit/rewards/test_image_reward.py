"""ImageReward on a tiny random checkpoint in ImageReward.pt's own (BLIP) layout, converted by
rewards.image_reward_convert, against BLIP's ViT written out here in torch and the head math by hand."""

import pytest
import torch
import torch.nn.functional as F

from rewards.image_reward import MEAN, STD, ImageRewardScore
from rewards.image_reward_convert import split_state_dict
from tiny_reward_models import IMAGE_REWARD_DIMS, random_uint8_images, save_tiny_image_reward

D = IMAGE_REWARD_DIMS
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return save_tiny_image_reward(tmp_path_factory.mktemp("image_reward"))


@torch.no_grad()
def blip_vit(state, pixels):
    """BLIP's models/vit.py VisionTransformer.forward on the blip.visual_encoder.* weights: patch conv,
    [CLS] + positions, pre-norm blocks (LayerNorm eps 1e-6, fused qkv, exact GELU), final norm on every token."""
    p = "blip.visual_encoder."
    w, heads = D["vision_width"], D["vision_heads"]
    x = F.conv2d(pixels, state[p + "patch_embed.proj.weight"], state[p + "patch_embed.proj.bias"], stride=D["patch"]).flatten(2).transpose(1, 2)
    x = torch.cat([state[p + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + state[p + "pos_embed"]
    for i in range(D["layers"]):
        b = f"{p}blocks.{i}."
        h = F.layer_norm(x, (w,), state[b + "norm1.weight"], state[b + "norm1.bias"], eps=1e-6)
        B, N, C = h.shape
        q, k, v = F.linear(h, state[b + "attn.qkv.weight"], state[b + "attn.qkv.bias"]).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(B, N, C), state[b + "attn.proj.weight"], state[b + "attn.proj.bias"])
        h = F.layer_norm(x, (w,), state[b + "norm2.weight"], state[b + "norm2.bias"], eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, state[b + "mlp.fc1.weight"], state[b + "mlp.fc1.bias"])), state[b + "mlp.fc2.weight"], state[b + "mlp.fc2.bias"])
    return F.layer_norm(x, (w,), state[p + "norm.weight"], state[p + "norm.bias"], eps=1e-6)


def test_converted_vision_tower_is_blips_vit(converted):
    from transformers import BlipVisionModel

    state, folder = converted
    pixels = torch.randn(2, 3, D["image"], D["image"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = BlipVisionModel.from_pretrained(folder / "vision").eval()(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(got, blip_vit(state, pixels), atol=1e-5, rtol=1e-4)


def test_score_is_the_standardised_head_on_the_cross_attending_cls_state(converted):
    from transformers import AutoTokenizer, BlipTextModel

    state, folder = converted
    prompts = ["a red circle", "two cats", "a photo of a car " * 12, "red"]  # the third is cut at 35 tokens
    images = random_uint8_images(4, 32, 32, seed=2)  # the tiny processor's size: no resampling in the reference
    text = BlipTextModel.from_pretrained(folder / "text", add_pooling_layer=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    expected = []
    for image, prompt in zip(images, prompts):  # one at a time, padded to 35 as ImageReward.score does
        tokens = tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        with torch.no_grad():
            cls = text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                       encoder_hidden_states=blip_vit(state, (image[None] - CLIP_MEAN) / CLIP_STD)).last_hidden_state[0, 0]
        x = cls
        for i in (0, 2, 4, 6, 7):
            x = x @ state[f"mlp.layers.{i}.weight"].T + state[f"mlp.layers.{i}.bias"]
        expected.append((x[0] - MEAN) / STD)
    expected = torch.stack(expected)
    reward = ImageRewardScore(str(folder), device="cpu")
    got = reward(images, prompts)
    assert got.shape == (4,) and got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert expected.std() > 1e-3  # told apart: a constant would not pass by accident
    chunked = ImageRewardScore(str(folder), batch_size=3, device="cpu")(images, prompts)
    torch.testing.assert_close(chunked, got, atol=1e-6, rtol=1e-5)


def test_gradient_reaches_the_pixels(converted):
    reward = ImageRewardScore(str(converted[1]), device="cpu")
    images = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(3), requires_grad=True)
    reward(images, ["a red circle", "a cat"]).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_converter_refuses_foreign_keys_and_lists_dropped_ones(converted):
    state, _ = converted
    *_, dropped = split_state_dict(state)
    assert sorted(dropped) == ["blip.text_proj.bias", "blip.text_proj.weight", "blip.vision_proj.bias", "blip.vision_proj.weight"]
    with pytest.raises(ValueError, match=r"1 keys do not belong.*blip.text_decoder"):
        split_state_dict(state | {"blip.text_decoder.cls.bias": torch.zeros(1)})


def test_missing_folder_says_how_to_convert():
    with pytest.raises(FileNotFoundError, match=r"ImageRewardScore: path='/nonexistent/ir' is not a folder.*rewards.image_reward_convert"):
        ImageRewardScore("/nonexistent/ir", device="cpu")
