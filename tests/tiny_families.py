"""Tiny random FLUX.1 and Qwen-Image pipelines built from config (no hub), for tests and bench/model_families.py.

Each builder returns a complete diffusers pipeline whose ``save_pretrained`` folder loads through the
family's adapter and through the family's own pipeline class. Dimensions follow each family's wiring at
toy sizes; every forward takes milliseconds on one CPU thread.
"""
from __future__ import annotations

import torch

# Image size the tiny models generate: the 2x VAEs give 8x8 latents, packed into 4x4 patches of 2x2.
TINY_FAMILY_SIZE = 16


def _clip_tokenizer():
    from conftest import _tiny_clip_tokenizer

    return _tiny_clip_tokenizer()


def build_tiny_flux(guidance_embeds: bool = True, seed: int = 0):
    """FluxPipeline: 1 double + 1 single block, 4-channel 2x VAE with FLUX's scaling/shift, CLIP + T5.

    FLUX wiring: in_channels is 4 latent channels x a 2x2 packed patch (16); pooled_projection_dim is
    the CLIP hidden size; joint_attention_dim is T5's d_model; the rope axes sum to the head dim.
    guidance_embeds=True is FLUX.1-dev's guidance-distilled layout, False FLUX.1-schnell's. The T5 slot
    uses a CLIP tokenizer (no T5 tokenizer can be built offline; the pipeline only calls it).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok = _clip_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                 decoder_start_token_id=0, pad_token_id=1, eos_token_id=1))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=TINY_FAMILY_SIZE,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    # FLUX.1's scheduler: the shift mu grows with the image's token count (dynamic shifting).
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    for module in (clip, t5, transformer, vae):
        module.eval()  # built from config they start in training mode, where T5's dropout draws noise
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
                        tokenizer_2=_clip_tokenizer(), transformer=transformer)


def tiny_qwen_tokenizer():
    """A byte-level BPE Qwen2Tokenizer with no merges: every byte is a token, plus Qwen's chat specials.

    Qwen-Image's prompt template uses <|im_start|>/<|im_end|>; registered as special tokens they stay
    single tokens, as in the real tokenizer. The real one has 151k merges; without merges the template
    is longer in tokens, which changes nothing in how the pipeline (and the adapter) use it.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    for s in specials:
        vocab[s] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    return tok


def build_tiny_qwen_image(seed: int = 0):
    """QwenImagePipeline: 1-block QwenImageTransformer2DModel, 4-channel AutoencoderKLQwenImage (2x),
    a 1-layer Qwen2.5-VL text encoder (with a 1-block vision tower, which text prompts never use).

    Qwen-Image wiring: in_channels is the VAE's z_dim x a 2x2 packed patch; out_channels is z_dim;
    joint_attention_dim is the text encoder's hidden size; Qwen2.5-VL's mrope sections sum to half its
    head dim. Non-trivial latents_mean/std, so decode's de-normalisation is exercised.
    """
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    tok = tiny_qwen_tokenizer()
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=2048, bos_token_id=pad, eos_token_id=pad, pad_token_id=pad,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0]),
    ))
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(2, 2, 4))
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[], temperal_downsample=[False],
        latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 2.0])
    # Qwen-Image's scheduler: exponential time shift with a resolution-dependent mu, stretched so the
    # last non-zero sigma is shift_terminal.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    for module in (text_encoder, transformer, vae):
        module.eval()
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer)


def save_tiny(pipeline, folder) -> str:
    """save_pretrained into ``folder``; returns it as a string (what model.path takes)."""
    pipeline.save_pretrained(folder)
    return str(folder)
