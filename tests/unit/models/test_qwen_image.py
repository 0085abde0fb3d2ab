"""QwenImagePolicy against the diffusers QwenImagePipeline it replaces, on a tiny random Qwen-Image folder
(a 1-layer Qwen2.5-VL text encoder and a byte-level Qwen2 tokenizer built offline)."""
from __future__ import annotations

import math

import pytest
import torch

from family_checks import (
    PROMPTS, TOL, check_bf16, check_export, check_gradient_checkpointing, check_state_dict_round_trip, check_training_step,
    initial_latents, ode_sample, perturb_all, perturb_lora,
)
from models.flux import pack, unpack
from models.qwen_image import QwenImagePolicy
from tiny_families import TINY_FAMILY_SIZE, build_tiny_flux, build_tiny_qwen_image, save_tiny

CFG = 4.0  # QwenImagePipeline's default true_cfg_scale


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return save_tiny(build_tiny_qwen_image(), tmp_path_factory.mktemp("tiny_qwen_image"))


@pytest.fixture(scope="module")
def pipeline(qwen_dir):
    from diffusers import QwenImagePipeline

    return QwenImagePipeline.from_pretrained(qwen_dir)


def make_policy(folder, finetune="lora", size=TINY_FAMILY_SIZE, dtype="float32", **kwargs):
    return QwenImagePolicy(folder, finetune=finetune, lora_rank=4, lora_alpha=8.0, height=size,
                           width=size, dtype=dtype, **kwargs)


def run_pipeline(pipe, latents, steps, cfg=CFG, prompts=PROMPTS[:1], output_type="latent", negative_prompt=" "):
    """QwenImagePipeline from our unpacked initial latents; final latents unpacked to [B, C, h, w] (or images)."""
    pipe.set_progress_bar_config(disable=True)
    _, _, h, w = latents.shape
    size = h * pipe.vae_scale_factor
    guidance = {"negative_prompt": [negative_prompt] * len(prompts), "true_cfg_scale": cfg} if cfg > 1 else {}
    out = pipe(prompts, latents=pack(latents), num_inference_steps=steps, height=size, width=size,
               output_type=output_type, **guidance).images
    return out if output_type != "latent" else unpack(out, h, w)


@pytest.mark.parametrize("size, cfg", [(TINY_FAMILY_SIZE, CFG), (32, 1.0)])
def test_ode_rollout_matches_the_qwen_image_pipeline(qwen_dir, pipeline, size, cfg):
    """Two prompts of different lengths in one batch (padded, masked); true CFG with the norm rescale
    and CFG off; the LoRA policy's reference (adapters perturbed) is the base model."""
    policy = make_policy(qwen_dir, size=size)
    perturb_lora(policy)
    latents, steps = initial_latents(policy, batch=2), 4
    assert latents.shape == (2, 4, size // 2, size // 2)  # the tiny VAE is 2x
    expected = run_pipeline(pipeline, latents, steps, cfg, PROMPTS)
    with policy.reference():
        final = ode_sample(policy, latents, steps, cfg, PROMPTS)
        images = policy.decode(final)
    assert (final - expected).abs().max() <= TOL
    assert (final - latents).abs().max() > 0.1
    expected_images = run_pipeline(pipeline, latents, steps, cfg, PROMPTS, output_type="pt")
    assert images.shape == expected_images.shape == (2, 3, size, size)
    assert (images - expected_images).abs().max() <= 1e-4
    assert (ode_sample(policy, latents, steps, cfg, PROMPTS) - expected).abs().max() > 1e-3  # adapters on


def test_negative_prompt_is_the_cfg_baseline(qwen_dir, pipeline):
    policy = make_policy(qwen_dir, negative_prompt="blurry")
    latents = initial_latents(policy, seed=1)
    expected = run_pipeline(pipeline, latents, 3, negative_prompt="blurry")
    assert (ode_sample(policy, latents, 3, CFG) - expected).abs().max() <= TOL
    assert (run_pipeline(pipeline, latents, 3) - expected).abs().max() > 1e-4  # " " would give another sample
    # Without CFG the negative prompt plays no part.
    assert torch.equal(ode_sample(policy, latents, 3, 1.0), ode_sample(make_policy(qwen_dir), latents, 3, 1.0))


def test_prompt_embeddings_are_the_pipelines(qwen_dir, pipeline):
    policy = make_policy(qwen_dir)
    for prompt in PROMPTS:
        embeds, mask = pipeline.encode_prompt(prompt, device="cpu")
        cond = policy.encode([prompt])
        assert mask is None and cond.mask is None  # one prompt: nothing padded
        assert torch.equal(cond.prompt_embeds, embeds)
    batch = policy.encode(PROMPTS)
    lengths = [policy._cache[p].shape[0] for p in PROMPTS]
    assert lengths[0] < lengths[1] and batch.prompt_embeds.shape[1] == lengths[1]
    assert batch.mask.tolist() == [[1] * lengths[0] + [0] * (lengths[1] - lengths[0]), [1] * lengths[1]]
    assert torch.all(batch.prompt_embeds[0, lengths[0]:] == 0)
    assert set(policy._cache) == {*PROMPTS, " "}  # cached: prompts and the negative prompt
    short = make_policy(qwen_dir, max_sequence_length=5).encode(PROMPTS)
    assert short.prompt_embeds.shape[1] == 5 and torch.equal(short.prompt_embeds, batch.prompt_embeds[:, :5])


def test_sigmas_are_the_pipelines_shifted_schedule(qwen_dir, pipeline):
    """Exponential shift by mu (linear in the packed token count), then stretched so the last non-zero
    sigma is the scheduler's shift_terminal (0.02)."""
    policy = make_policy(qwen_dir, size=32)
    tokens = (32 // 4) ** 2
    mu = 0.5 + (0.9 - 0.5) / (8192 - 256) * (tokens - 256)
    s = torch.linspace(1.0, 1 / 5, 5, dtype=torch.float64)
    shifted = math.exp(mu) / (math.exp(mu) + 1 / s - 1)
    stretched = 1 - (1 - shifted) * (1 - 0.02) / (1 - shifted[-1])
    sigmas = policy.sigmas(5)
    assert sigmas.shape == (6,) and sigmas[-1] == 0
    torch.testing.assert_close(sigmas[:-1], stretched.float(), rtol=1e-6, atol=1e-6)
    assert sigmas[-2] == pytest.approx(0.02)


def test_full_finetune_policy_and_reference(qwen_dir, pipeline):
    policy = make_policy(qwen_dir, finetune="full")
    latents = initial_latents(policy, seed=2)
    expected = run_pipeline(pipeline, latents, 3)
    assert (ode_sample(policy, latents, 3, CFG) - expected).abs().max() <= TOL
    perturb_all(policy)
    assert (ode_sample(policy, latents, 3, CFG) - expected).abs().max() > 1e-3
    with policy.reference():
        assert (ode_sample(policy, latents, 3, CFG) - expected).abs().max() <= TOL


def test_bad_folders_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'model_index.json'}.*Qwen-Image"):
        QwenImagePolicy(str(tmp_path))
    flux = save_tiny(build_tiny_flux(), tmp_path / "flux")
    with pytest.raises(ValueError, match="not a Qwen-Image checkpoint.*FluxTransformer2DModel.*needs QwenImageTransformer2DModel"):
        QwenImagePolicy(flux)
    with pytest.raises(ValueError, match="multiples of 4"):
        make_policy(save_tiny(build_tiny_qwen_image(), tmp_path / "qwen"), size=18)


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_one_training_step_moves_only_trainable_weights(qwen_dir, finetune):
    check_training_step(make_policy(qwen_dir, finetune=finetune), CFG)


def test_gradient_checkpointing_gives_the_same_gradients(qwen_dir):
    check_gradient_checkpointing(lambda **kw: make_policy(qwen_dir, **kw), CFG)


def test_trainable_state_dict_round_trip(qwen_dir):
    check_state_dict_round_trip(lambda: make_policy(qwen_dir))


def test_lora_exports_to_diffusers(qwen_dir, tmp_path):
    from diffusers import QwenImagePipeline

    policy = make_policy(qwen_dir)
    perturb_lora(policy, scale=0.2)
    check_export(policy, QwenImagePipeline, qwen_dir, run_pipeline, CFG, tmp_path)


def test_full_finetune_exports_to_diffusers(qwen_dir, tmp_path):
    from diffusers import QwenImagePipeline

    policy = make_policy(qwen_dir, finetune="full", needs_reference=False)
    perturb_all(policy)
    check_export(policy, QwenImagePipeline, qwen_dir, run_pipeline, CFG, tmp_path)


def test_bf16_weights_with_fp32_adapters_train(tmp_path, qwen_dir):
    check_bf16(make_policy(qwen_dir, dtype="bfloat16"), CFG, tmp_path)


def test_model_config_builds_the_policy(qwen_dir):
    """conf/model/qwen_image.yaml composes (every key is a constructor argument) and builds the adapter."""
    from family_checks import compose_model

    policy = compose_model("qwen_image", qwen_dir, ["model.height=16", "model.width=16"])
    assert isinstance(policy, QwenImagePolicy) and policy.negative_prompt == " " and policy.max_sequence_length == 512
    assert policy.transformer.is_gradient_checkpointing and policy.dtype == torch.float32  # auto on CPU
    assert sum("lora_A" in n for n, _ in policy.transformer.named_parameters()) == 8  # the 8 projections of 1 block
