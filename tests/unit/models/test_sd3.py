"""SD3Policy against the diffusers StableDiffusion3Pipeline it replaces, on a tiny random SD3 folder."""
from __future__ import annotations

import pytest
import torch

from models.sd3 import SD3Policy
from samplers.flow_sde import FlowSDESampler

SIZE = 16  # pixels; the tiny VAE halves it (conftest.TINY_SD3_SIZE)
T5_TOKENS = 16  # passed to both the policy and the pipeline; SD3's 256 would only be slower
PROMPT = "a red circle"


def make_policy(folder, finetune="lora", **kwargs):
    return SD3Policy(
        str(folder), finetune=finetune, lora_rank=4, lora_alpha=8.0, dtype="float32", max_sequence_length=T5_TOKENS,
        height=SIZE, width=SIZE, **kwargs,
    )


def perturb_lora(policy, seed=0):
    """Give every LoRA B a non-zero value (gaussian init leaves B = 0, so the adapter starts as identity)."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in policy.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
                n += 1
    assert n > 0, "no LoRA weights found"


@pytest.fixture(scope="module")
def pipeline(tiny_sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def initial_latents(policy, seed=0):
    shape = policy.latent_shape(SIZE, SIZE)
    assert shape == (16, SIZE // 2, SIZE // 2)
    return torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed))


def ode_sample(policy, latents, num_steps, guidance_scale):
    sampler = FlowSDESampler(noise_level=0.0)
    cond = policy.encode([PROMPT])
    traj = sampler.rollout(
        lambda x, sigma, c: policy.predict(x, sigma, c, guidance_scale), latents, policy.sigmas(num_steps), cond,
        [torch.Generator()], torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
    )
    return traj.final


def pipeline_sample(pipeline, latents, num_steps, guidance_scale, output_type):
    return pipeline(
        PROMPT, latents=latents.clone(), num_inference_steps=num_steps, guidance_scale=guidance_scale,
        output_type=output_type, height=SIZE, width=SIZE, max_sequence_length=T5_TOKENS,
    ).images


@pytest.mark.parametrize("guidance_scale", [4.5, 1.0])
def test_ode_rollout_matches_the_diffusers_pipeline(tiny_sd3_dir, pipeline, guidance_scale):
    """The LoRA policy's reference (adapters off, here perturbed so they would matter) is the base model."""
    policy = make_policy(tiny_sd3_dir)
    perturb_lora(policy)
    latents, steps = initial_latents(policy), 6
    expected = pipeline_sample(pipeline, latents, steps, guidance_scale, "latent")
    with policy.reference():
        final = ode_sample(policy, latents, steps, guidance_scale)
    assert final.shape == expected.shape
    assert (final - expected).abs().max() <= 1e-5
    # The sampling moved far from the start, so the match above is not trivial.
    assert (final - latents).abs().max() > 0.1
    # Decoding: the pipeline's output_type="pt" images are [0, 1] in [B, 3, H, W].
    images = policy.decode(final)
    expected_images = pipeline_sample(pipeline, latents, steps, guidance_scale, "pt")
    assert images.shape == expected_images.shape == (1, 3, SIZE, SIZE)
    assert (images - expected_images).abs().max() <= 1e-4
    # Adapters on (perturbed): a different model, so a different sample.
    assert (ode_sample(policy, latents, steps, guidance_scale) - expected).abs().max() > 1e-3


def test_full_finetune_policy_matches_the_pipeline(tiny_sd3_dir, pipeline):
    policy = make_policy(tiny_sd3_dir, finetune="full")
    latents, steps = initial_latents(policy, seed=1), 4
    expected = pipeline_sample(pipeline, latents, steps, 4.5, "latent")
    assert (ode_sample(policy, latents, steps, 4.5) - expected).abs().max() <= 1e-5
    with policy.reference():
        assert (ode_sample(policy, latents, steps, 4.5) - expected).abs().max() <= 1e-5


def test_fresh_lora_is_the_base_model(tiny_sd3_dir, pipeline):
    """A fresh adapter (B = 0) leaves the model unchanged: the first RL step starts from the base."""
    policy = make_policy(tiny_sd3_dir)
    latents = initial_latents(policy, seed=2)
    expected = pipeline_sample(pipeline, latents, 3, 4.5, "latent")
    assert (ode_sample(policy, latents, 3, 4.5) - expected).abs().max() <= 1e-5


def test_sigmas_are_the_schedulers(tiny_sd3_dir, pipeline):
    """shift=3 schedule, N+1 values from 1 down to 0, as the pipeline's scheduler sets them."""
    policy = make_policy(tiny_sd3_dir)
    sigmas = policy.sigmas(5)
    pipeline.scheduler.set_timesteps(5)
    assert torch.equal(sigmas, pipeline.scheduler.sigmas.float())
    assert sigmas.shape == (6,) and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    # The shift of 3 is really applied: timesteps are uniform in the unshifted sigma, from 1 down to
    # the scheduler's smallest training sigma (1/1000, shifted once at construction).
    shift = lambda s: 3 * s / (1 + 2 * s)  # noqa: E731
    t = torch.linspace(1.0, shift(1e-3), 5)
    torch.testing.assert_close(sigmas[:-1], shift(t))


def test_missing_model_index_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "model_index.json")):
        SD3Policy(str(tmp_path))


def test_unknown_finetune_mode_raises(tiny_sd3_dir):
    with pytest.raises(ValueError, match="'lora' or 'full'.*'bad'"):
        make_policy(tiny_sd3_dir, finetune="bad")


def _predict_once(policy, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *policy.latent_shape(SIZE, SIZE), generator=g)
    cond = policy.encode([PROMPT, "a blue square"])
    with torch.no_grad():
        return policy.predict(x, torch.tensor([0.9, 0.4]), cond, 4.5)


def test_lora_reference_is_the_base_model(tiny_sd3_dir):
    policy = make_policy(tiny_sd3_dir)
    base = _predict_once(policy)  # fresh adapters are identity
    perturb_lora(policy)
    tuned = _predict_once(policy)
    assert (tuned - base).abs().max() > 1e-3
    with policy.reference():
        assert torch.equal(_predict_once(policy), base)
    assert torch.equal(_predict_once(policy), tuned)  # adapters back on after the context
    with pytest.raises(RuntimeError, match="boom"), policy.reference():
        raise RuntimeError("boom")
    assert torch.equal(_predict_once(policy), tuned)  # ... even when the context body raised


def test_full_reference_is_a_frozen_copy(tiny_sd3_dir):
    policy = make_policy(tiny_sd3_dir, finetune="full")
    base = _predict_once(policy)
    with torch.no_grad():
        for p in policy.transformer.parameters():
            p.add_(0.05)
    tuned = _predict_once(policy)
    assert (tuned - base).abs().max() > 1e-3
    with policy.reference():
        assert torch.equal(_predict_once(policy), base)
    assert torch.equal(_predict_once(policy), tuned)
    no_ref = make_policy(tiny_sd3_dir, finetune="full", needs_reference=False)
    with pytest.raises(RuntimeError, match="needs_reference"), no_ref.reference():
        pass


def test_trainable_state_dict_round_trip(tiny_sd3_dir):
    source = make_policy(tiny_sd3_dir)
    perturb_lora(source, seed=1)
    state = source.trainable_state_dict()
    assert state and all("lora_" in k for k in state)  # only the adapters train
    trainable = {k for k, p in source.transformer.named_parameters() if p.requires_grad}
    assert set(state) == trainable

    target = make_policy(tiny_sd3_dir)  # its own random LoRA A, B = 0
    assert not torch.equal(_predict_once(target), _predict_once(source))
    target.load_trainable_state_dict(state)
    assert torch.equal(_predict_once(target), _predict_once(source))
    for k, v in target.trainable_state_dict().items():
        assert torch.equal(v, state[k]), k

    # The returned dict is a copy: editing it does not touch the model.
    before = _predict_once(source)
    for v in state.values():
        v.zero_()
    assert torch.equal(_predict_once(source), before)


def test_load_trainable_state_dict_rejects_unknown_keys_before_loading(tiny_sd3_dir):
    policy = make_policy(tiny_sd3_dir)
    before = _predict_once(policy)
    state = {k: v + 1.0 for k, v in policy.trainable_state_dict().items()}  # would change the model
    state["transformer_blocks.99.attn.to_q.lora_A.default.weight"] = torch.zeros(4, 4)
    with pytest.raises(KeyError, match="lacks.*transformer_blocks.99"):
        policy.load_trainable_state_dict(state)
    assert torch.equal(_predict_once(policy), before)  # nothing half-loaded
