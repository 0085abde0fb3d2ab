"""Tiny random SD1.x and SDXL pipelines built from config (never a hub download), for the UNet-family tests.

Both save with ``save_pretrained`` into a folder that ``models.unet.UNetPolicy`` and the diffusers
pipelines load. 16 px images, a 2x VAE, 8x8x4 latents. The saved scheduler is the family's shipped one
(PNDM for SD1.5, Euler for SDXL), so loading exercises the conversion to DDIM.
"""
from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from conftest import _tiny_clip_tokenizer

SIZE = 16  # pixels; latents are SIZE // 2
# SD's noise schedule (scaled_linear 0.00085..0.012, steps_offset 1, set_alpha_to_one False).
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                   steps_offset=1, clip_sample=False, set_alpha_to_one=False)


def _clip(tokenizer, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=16, bos_token_id=0,
                            eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _vae(scaling_factor: float, force_upcast: bool = False):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=SIZE,
        scaling_factor=scaling_factor, force_upcast=force_upcast).eval()


class NearIdentityUNet(UNet2DConditionModel):
    """eps = x + (a random UNet scaled down). A random UNet alone predicts an eps ~ N(0, 1) that makes
    x0_hat = (x - s eps) / sqrt(abar) ~ 20 at SD's first step (abar 0.005), where fp32 keeps only ~2e-6
    absolute and 1 - s^2 recovers abar to 1e-5 relative; near eps = x the chain stays in the range a
    trained model keeps it in, so a 1e-5 comparison tests the wiring, not fp32's spacing at 20. Saved
    folders name this module as the class's library (importable with tests/ on sys.path)."""

    def forward(self, sample, timestep, *args, return_dict=True, **kwargs):
        out = sample + super().forward(sample, timestep, *args, return_dict=False, **kwargs)[0]
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


def _unet(cross_attention_dim: int, near_identity: bool = False, **extra):
    cls = NearIdentityUNet if near_identity else UNet2DConditionModel
    unet = cls(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=4, **extra).eval()
    if near_identity:
        with torch.no_grad():
            unet.conv_out.weight.mul_(0.1)
    return unet


def build_tiny_sd15(seed: int = 0, prediction_type: str = "epsilon", guidance_embedded: bool = False,
                    near_identity: bool = False):
    """StableDiffusionPipeline: UNet2DConditionModel + CLIPTextModel + AutoencoderKL, PNDM scheduler.
    guidance_embedded: an LCM-style UNet taking the guidance scale as input (time_cond_proj_dim)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    torch.manual_seed(seed)
    tokenizer = _tiny_clip_tokenizer()
    unet = _unet(16, near_identity, time_cond_proj_dim=8 if guidance_embedded else None)
    scheduler = PNDMScheduler(**{k: v for k, v in SD_SCHEDULE.items() if k != "clip_sample"}, skip_prk_steps=True,
                              prediction_type=prediction_type)
    scheduler.register_to_config(clip_sample=False)  # as SD1.5's shipped PNDM config records it
    return StableDiffusionPipeline(vae=_vae(0.18215), text_encoder=_clip(tokenizer, False), tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_tiny_sdxl(seed: int = 0, prediction_type: str = "epsilon", near_identity: bool = False):
    """StableDiffusionXLPipeline: a text_time UNet, CLIP-L-like + CLIP-G-like (with projection) encoders,
    Euler scheduler, SDXL's VAE scaling factor and force_upcast."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    torch.manual_seed(seed)
    # add_embedding input = addition_time_embed_dim x 6 time ids + CLIP-G's projection dim: 4 * 6 + 16.
    unet = _unet(32, near_identity, addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=4 * 6 + 16, use_linear_projection=True,
                 transformer_layers_per_block=1)
    scheduler = EulerDiscreteScheduler(**{k: v for k, v in SD_SCHEDULE.items() if k not in ("clip_sample", "set_alpha_to_one")},
                                       timestep_spacing="leading", prediction_type=prediction_type)
    scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False)  # as SDXL's shipped Euler config records them
    return StableDiffusionXLPipeline(
        vae=_vae(0.13025, force_upcast=True), text_encoder=_clip(_tiny_clip_tokenizer(), False),
        text_encoder_2=_clip(_tiny_clip_tokenizer(), True), tokenizer=_tiny_clip_tokenizer(),
        tokenizer_2=_tiny_clip_tokenizer(), unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False)


def save_tiny(pipeline, folder):
    pipeline.save_pretrained(folder)
    return folder
