"""FluxPolicy against the diffusers FluxPipeline it replaces, on tiny random FLUX.1-dev / schnell folders."""
from __future__ import annotations

import math

import pytest
import torch

from family_checks import (
    PROMPTS, TOL, check_bf16, check_export, check_gradient_checkpointing, check_state_dict_round_trip, check_training_step,
    initial_latents, ode_sample, perturb_all, perturb_lora,
)
from models.flux import FluxPolicy, image_ids, pack, unpack
from tiny_families import TINY_FAMILY_SIZE, build_tiny_flux, save_tiny

T5_TOKENS = 16  # passed to both the policy and the pipeline; FLUX.1-dev's 512 would only be slower
GUIDANCE = 3.5  # FLUX.1-dev's usual distilled guidance


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return save_tiny(build_tiny_flux(), tmp_path_factory.mktemp("tiny_flux_dev"))


@pytest.fixture(scope="module")
def schnell_dir(tmp_path_factory):
    return save_tiny(build_tiny_flux(guidance_embeds=False), tmp_path_factory.mktemp("tiny_flux_schnell"))


def make_policy(folder, finetune="lora", size=TINY_FAMILY_SIZE, dtype="float32", **kwargs):
    return FluxPolicy(folder, finetune=finetune, lora_rank=4, lora_alpha=8.0,
                      max_sequence_length=T5_TOKENS, height=size, width=size, dtype=dtype, **kwargs)


def run_pipeline(pipe, latents, steps, guidance_scale=GUIDANCE, output_type="latent", prompt=PROMPTS[0]):
    """FluxPipeline from our unpacked initial latents; final latents unpacked to [B, C, h, w] (or images)."""
    pipe.set_progress_bar_config(disable=True)
    _, _, h, w = latents.shape
    size = h * pipe.vae_scale_factor
    out = pipe(prompt, latents=pack(latents), num_inference_steps=steps, guidance_scale=guidance_scale, height=size,
               width=size, max_sequence_length=T5_TOKENS, output_type=output_type).images
    return out if output_type != "latent" else unpack(out, h, w)


@pytest.fixture(scope="module")
def pipeline(flux_dir):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(flux_dir)


def test_pack_is_the_pipelines_and_inverts():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 6, 8)
    assert torch.equal(pack(x), FluxPipeline._pack_latents(x, 2, 4, 6, 8))
    assert torch.equal(unpack(pack(x), 6, 8), x)
    assert torch.equal(image_ids(6, 8, "cpu", torch.float32), FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))


@pytest.mark.parametrize("size, guidance_scale", [(TINY_FAMILY_SIZE, GUIDANCE), (32, 1.5)])
def test_ode_rollout_matches_the_flux_pipeline(flux_dir, pipeline, size, guidance_scale):
    """The LoRA policy's reference (adapters off, perturbed so they would matter) is the base model; at
    two sizes (the schedule's shift depends on the token count) and two guidance values."""
    policy = make_policy(flux_dir, size=size)
    perturb_lora(policy)
    latents, steps = initial_latents(policy), 5
    assert latents.shape == (1, 4, size // 2, size // 2)  # the tiny VAE is 2x; packing needs even sides
    expected = run_pipeline(pipeline, latents, steps, guidance_scale)
    with policy.reference():
        final = ode_sample(policy, latents, steps, guidance_scale)
        images = policy.decode(final)
    assert (final - expected).abs().max() <= TOL
    assert (final - latents).abs().max() > 0.1  # sampling went somewhere: the match is not trivial
    expected_images = run_pipeline(pipeline, latents, steps, guidance_scale, output_type="pt")
    assert images.shape == expected_images.shape == (1, 3, size, size)
    assert (images - expected_images).abs().max() <= 1e-4
    # Adapters on: another model, another sample; another guidance value: another sample too.
    assert (ode_sample(policy, latents, steps, guidance_scale) - expected).abs().max() > 1e-3
    with policy.reference():
        assert (ode_sample(policy, latents, steps, guidance_scale + 2.0) - expected).abs().max() > 1e-4


def test_sigmas_are_the_pipelines_shifted_schedule(flux_dir):
    """sigma' = e^mu / (e^mu + 1/sigma - 1) on linspace(1, 1/S, S), mu linear in the packed token count."""
    for size in (16, 64):
        policy = make_policy(flux_dir, size=size)
        tokens = (size // 4) ** 2  # 2x VAE, 2x2 packing
        mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256)
        s = torch.linspace(1.0, 1 / 6, 6, dtype=torch.float64)
        expected = math.exp(mu) / (math.exp(mu) + 1 / s - 1)
        sigmas = policy.sigmas(6)
        assert sigmas.shape == (7,) and sigmas.dtype == torch.float32 and sigmas[-1] == 0
        torch.testing.assert_close(sigmas[:-1], expected.float(), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(make_policy(flux_dir, size=16).sigmas(6), sigmas)


def test_schnell_takes_no_guidance(schnell_dir):
    from diffusers import FluxPipeline

    policy = make_policy(schnell_dir)
    assert not policy.guidance_embeds
    latents = initial_latents(policy, seed=1)
    expected = run_pipeline(FluxPipeline.from_pretrained(schnell_dir), latents, 3, guidance_scale=0.0)
    assert (ode_sample(policy, latents, 3, 1.0) - expected).abs().max() <= TOL
    with pytest.raises(ValueError, match="no guidance embedding.*sampler.guidance_scale=1"):
        ode_sample(policy, latents, 3, 3.5)


def test_full_finetune_policy_and_reference(flux_dir, pipeline):
    policy = make_policy(flux_dir, finetune="full")
    latents = initial_latents(policy, seed=2)
    expected = run_pipeline(pipeline, latents, 4)
    assert (ode_sample(policy, latents, 4, GUIDANCE) - expected).abs().max() <= TOL
    perturb_all(policy)
    assert (ode_sample(policy, latents, 4, GUIDANCE) - expected).abs().max() > 1e-3
    with policy.reference():
        assert (ode_sample(policy, latents, 4, GUIDANCE) - expected).abs().max() <= TOL
    no_ref = make_policy(flux_dir, finetune="full", needs_reference=False)
    with pytest.raises(RuntimeError, match="needs_reference"), no_ref.reference():
        pass


def test_bad_folders_name_the_problem(tmp_path, tiny_sd3_dir):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'model_index.json'}.*FLUX"):
        FluxPolicy(str(tmp_path))
    with pytest.raises(ValueError, match="not a FLUX.1 checkpoint.*SD3Transformer2DModel.*needs FluxTransformer2DModel"):
        FluxPolicy(str(tiny_sd3_dir))


def test_unknown_finetune_mode_raises(flux_dir):
    with pytest.raises(ValueError, match="'lora' or 'full'.*'bad'"):
        make_policy(flux_dir, finetune="bad")


def test_text_embeddings_are_cached_per_prompt(flux_dir):
    policy = make_policy(flux_dir)
    batch = policy.encode([PROMPTS[1], PROMPTS[0], PROMPTS[1]])
    assert set(policy._cache) == set(PROMPTS)
    assert batch.prompt_embeds.shape == (3, T5_TOKENS, 32) and batch.pooled.shape == (3, 16)
    alone = policy.encode([PROMPTS[0]])
    assert torch.equal(batch.prompt_embeds[1], alone.prompt_embeds[0]) and torch.equal(batch.pooled[1], alone.pooled[0])
    assert not torch.equal(batch.pooled[0], batch.pooled[1])
    policy.clip = policy.t5 = None  # a cached prompt never reaches the encoders again
    assert torch.equal(policy.encode([PROMPTS[0]]).prompt_embeds, alone.prompt_embeds)


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_one_training_step_moves_only_trainable_weights(flux_dir, finetune):
    check_training_step(make_policy(flux_dir, finetune=finetune), GUIDANCE)


def test_gradient_checkpointing_gives_the_same_gradients(flux_dir):
    check_gradient_checkpointing(lambda **kw: make_policy(flux_dir, **kw), GUIDANCE)


def test_trainable_state_dict_round_trip(flux_dir):
    check_state_dict_round_trip(lambda: make_policy(flux_dir))


def test_lora_exports_to_diffusers(flux_dir, tmp_path):
    from diffusers import FluxPipeline

    policy = make_policy(flux_dir)
    perturb_lora(policy, scale=0.2)
    check_export(policy, FluxPipeline, flux_dir, run_pipeline, GUIDANCE, tmp_path)


def test_full_finetune_exports_to_diffusers(flux_dir, tmp_path):
    from diffusers import FluxPipeline

    policy = make_policy(flux_dir, finetune="full", needs_reference=False)
    perturb_all(policy)
    check_export(policy, FluxPipeline, flux_dir, run_pipeline, GUIDANCE, tmp_path)
    with pytest.raises(ValueError, match="save_lora needs model.finetune=lora"):
        policy.save_lora(tmp_path / "lora")


def test_bf16_weights_with_fp32_adapters_train(tmp_path, flux_dir):
    check_bf16(make_policy(flux_dir, dtype="bfloat16"), GUIDANCE, tmp_path)


@pytest.mark.parametrize("config, guidance_embeds", [("flux_1_dev", True), ("flux_1_schnell", False)])
def test_model_configs_build_the_policy(flux_dir, schnell_dir, config, guidance_embeds):
    """conf/model/<config>.yaml composes (every key is a constructor argument) and builds the adapter."""
    from family_checks import compose_model

    folder = flux_dir if guidance_embeds else schnell_dir
    policy = compose_model(config, folder, ["model.max_sequence_length=16", "model.height=16", "model.width=16"])
    assert isinstance(policy, FluxPolicy) and policy.guidance_embeds == guidance_embeds
    assert policy.transformer.is_gradient_checkpointing and policy.dtype == torch.float32  # auto on CPU
    assert {n.rsplit(".lora_A", 1)[0].rsplit(".", 1)[-1] for n, _ in policy.transformer.named_parameters()
            if "lora_A" in n} == {"to_q", "to_k", "to_v", "0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}


def test_fixed_schedule_shift_is_dancegrpo_schedule(flux_dir):
    """Ground truth: DanceGRPO / MixGRPO's FLUX schedule, s t / (1 + (s - 1) t) over t = linspace(1, 0, S+1),
    written out here in float64 for s = 3, S = 16; the default keeps the pipeline's resolution shift."""
    S, s = 16, 3.0
    expected = [s * (1 - i / S) / (1 + (s - 1) * (1 - i / S)) for i in range(S + 1)]
    got = make_policy(flux_dir, schedule_shift=s).sigmas(S)
    assert got.dtype == torch.float32 and got.shape == (S + 1,)
    assert torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-7, rtol=0)
    assert got[0] == 1.0 and got[-1] == 0.0
    default = make_policy(flux_dir).sigmas(S)
    assert not torch.allclose(default, got)  # the pipeline's mu shift is another schedule
    with pytest.raises(ValueError, match="model.schedule_shift"):
        make_policy(flux_dir, schedule_shift=0.0)
