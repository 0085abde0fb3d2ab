"""Shared fixtures: tiny models built from config (never a hub download), saved as diffusers folders."""
from __future__ import annotations

import string

import pytest
import torch

# One thread: results must not depend on the machine's core count, and CI shares its cores.
torch.set_num_threads(1)

# Image size the tiny SD3 generates: 16 px with a 2x VAE gives 8x8 latents, 4x4 patches of 2.
TINY_SD3_SIZE = 16


def _tiny_clip_tokenizer():
    """A CLIP BPE tokenizer over single letters plus a couple of merges, built offline.

    transformers 5 takes ``vocab`` (dict) and ``merges`` (list of pairs); the vocab_file/merges_file
    form is silently ignored there. ``model_max_length=77`` is what the SD3 pipeline pads CLIP to
    (and the CLIP position table's size); without it the tokenizer's default overflows.
    """
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
    for c in string.ascii_lowercase:
        vocab[c + "</w>"] = len(vocab)
    merges = [("r", "e"), ("re", "d</w>"), ("c", "i"), ("ci", "r")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_tiny_sd3_pipeline(seed: int = 0):
    """A complete, random StableDiffusion3Pipeline: 2-layer MMDiT, 16-channel VAE, CLIP x2 and T5.

    Dimensions follow SD3's wiring: the transformer's pooled_projection_dim is the two CLIP
    projections concatenated (2 x 16), and joint_attention_dim is T5's d_model (32), which must be at
    least the two CLIP hidden sizes concatenated (2 x 16) because the pipeline pads CLIP to it.
    The T5 slot uses a CLIP tokenizer (a T5 tokenizer cannot be built offline); the pipeline only
    calls it like any tokenizer.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = _tiny_clip_tokenizer()

    def clip():
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
            )
        )

    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
            decoder_start_token_id=0, pad_token_id=1, eos_token_id=1,
        )
    )
    transformer = SD3Transformer2DModel(
        sample_size=TINY_SD3_SIZE // 2, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=16,
    )
    # SD3's VAE scaling/shift factors, so decode's un-scaling is exercised with non-trivial values.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8), layers_per_block=1, latent_channels=16, norm_num_groups=4, sample_size=TINY_SD3_SIZE,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=clip(), tokenizer=tokenizer,
        text_encoder_2=clip(), tokenizer_2=_tiny_clip_tokenizer(),
        text_encoder_3=t5, tokenizer_3=_tiny_clip_tokenizer(),
    )


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """Folder of a tiny random SD3 pipeline (model_index.json + all components), saved once per session."""
    folder = tmp_path_factory.mktemp("tiny_sd3")
    build_tiny_sd3_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_toy_dir(tmp_path_factory):
    """Folder of a (smaller than default) random shapes-world toy: 16 px, pixel space, no VAE or T5."""
    from models.toy.build import build_toy, save_toy
    from models.toy.shapes import vocabulary

    components = build_toy(
        words=vocabulary(), image_size=16, patch_size=4, num_layers=2, heads=2, head_dim=16, text_dim=32, max_tokens=16,
    )
    return save_toy(components, tmp_path_factory.mktemp("tiny_toy"))
