"""UNetPolicy (SD1.x and SDXL) against the diffusers pipelines it replaces, on tiny random folders saved with
save_pretrained (tests/tiny_unet_pipelines.py): loading, epsilon and v-prediction, DDIM against
StableDiffusionPipeline / StableDiffusionXLPipeline with a DDIMScheduler, rollouts with log-probs, a training
step, and the LoRA / merged exports loaded back by diffusers."""
from __future__ import annotations

import json

import pytest
import torch

from models.unet import UNetPolicy, guidance_embedding
from samplers.ddim import DDIMSampler
from tiny_unet_pipelines import SIZE, build_tiny_sd15, build_tiny_sdxl, save_tiny

PROMPT = "a red circle"
TOL = 1e-5
BUILDERS = {"sd15": build_tiny_sd15, "sdxl": build_tiny_sdxl}


def make_policy(folder, finetune="lora", dtype="float32", **kwargs):
    # alpha != rank: the LoRA scale (2) must survive the export.
    return UNetPolicy(str(folder), finetune=finetune, lora_rank=4, lora_alpha=8.0, dtype=dtype, **kwargs)


def ddim_pipeline(pipe):
    """The pipeline with DDPO's scheduler swap: a DDIMScheduler built from the shipped scheduler's config."""
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(folder):
    import diffusers

    name = json.loads((folder / "model_index.json").read_text())["_class_name"]
    return ddim_pipeline(getattr(diffusers, name).from_pretrained(folder))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Saved tiny models per (family, kind), and the in-memory pipelines they were saved from.

    "eps": an epsilon model whose UNet is near the identity (tiny_unet_pipelines.NearIdentityUNet, a
    custom class diffusers' pipeline loader refuses, so the comparison uses the in-memory pipeline);
    "v": a stock UNet2DConditionModel with v-prediction (bounded x0_hat as it is); "lcm": a
    guidance-embedded SD1.x UNet.
    """
    builds = {}
    for family, build in BUILDERS.items():
        builds[family, "eps"] = build(seed=1, near_identity=True)
        builds[family, "v"] = build(seed=2, prediction_type="v_prediction")
    builds["sd15", "lcm"] = build_tiny_sd15(seed=3, guidance_embedded=True, near_identity=True)
    root = tmp_path_factory.mktemp("tiny_unets")
    return {key: (save_tiny(pipe, root / "_".join(key)), ddim_pipeline(pipe)) for key, pipe in builds.items()}


def initial_latents(policy, seed=0, batch=1):
    shape = policy.latent_shape(SIZE, SIZE)
    assert shape == (4, SIZE // 2, SIZE // 2)
    return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed))


def rollout(policy, latents, steps, guidance_scale, eta=0.0, prompts=(PROMPT,), seed=0):
    sampler = DDIMSampler(noise_level=eta, num_steps=steps, guidance_scale=guidance_scale)
    B = latents.shape[0]
    traj = sampler.rollout(
        lambda x, s, c: policy.predict(x, s, c, guidance_scale), latents, policy.sigmas(steps), policy.encode(list(prompts)),
        [torch.Generator().manual_seed(seed + i) for i in range(B)], torch.zeros(B, dtype=torch.long), torch.arange(B))
    return sampler, traj


def pipeline_sample(pipe, latents, steps, guidance_scale, output_type="latent"):
    return pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=guidance_scale, eta=0.0,
                latents=latents.clone(), output_type=output_type).images


def perturb_lora(policy, seed=0, scale=0.3):
    """Give every LoRA B a non-zero value (gaussian init leaves B = 0: a fresh adapter is the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lora_b = [p for n, p in policy.unet.named_parameters() if "lora_B" in n]
        for p in lora_b:
            p.copy_(scale * torch.randn(p.shape, generator=g))
    assert lora_b


# -------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_loads_the_family_from_its_folder(folders, family):
    from diffusers import DDIMScheduler

    folder, _ = folders[family, "v"]
    policy = make_policy(folder)
    assert policy.sdxl == (family == "sdxl")
    assert len(policy.text) == (2 if family == "sdxl" else 1)
    assert isinstance(policy.scheduler, DDIMScheduler)  # the folder ships PNDM (SD1.5) or Euler (SDXL)
    assert policy.scheduler.config.prediction_type == "v_prediction"
    assert (policy.height, policy.width) == (SIZE, SIZE)  # the pipeline's default: sample_size x the VAE factor
    assert policy.transformer is policy.unet
    assert policy.prediction == DDIMSampler.kernel.prediction == "epsilon"
    trainable = [n for n, p in policy.unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"to_q", "to_k", "to_v", "0"}  # to_out.0
    cond = policy.encode([PROMPT, "a blue square"])
    assert cond.prompt_embeds.shape == (2, 77, 32 if family == "sdxl" else 16)
    if family == "sdxl":
        assert cond.pooled.shape == (2, 16)
        # force_zeros_for_empty_prompt: the unconditional input is zeros, not the encoded "".
        assert not cond.neg_prompt_embeds.any() and not cond.neg_pooled.any()
    else:
        assert cond.pooled is None
        assert torch.equal(cond.neg_prompt_embeds[0], policy.encode([""]).prompt_embeds[0])


def test_a_bad_folder_is_a_clear_error(tmp_path, tiny_sd3_dir, folders):
    with pytest.raises(FileNotFoundError, match="model.path=.*model_index.json is missing"):
        UNetPolicy(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="has no UNet.*StableDiffusion3Pipeline.*model=sd3_5_medium"):
        UNetPolicy(str(tiny_sd3_dir))
    folder, _ = folders["sd15", "v"]
    with pytest.raises(ValueError, match="'lora' or 'full'.*'qlora'"):
        make_policy(folder, finetune="qlora")
    # A scheduler that clips x0_hat is one the DDIM kernel cannot reproduce.
    import shutil

    clipped = tmp_path / "clipped"
    shutil.copytree(folder, clipped)
    config_file = clipped / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "clip_sample": True}))
    with pytest.raises(ValueError, match="clip or threshold.*clip_sample.*scheduler_config.json"):
        make_policy(clipped)
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "clip_sample": False,
                                       "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}))
    with pytest.raises(ValueError, match="zero terminal SNR"):
        make_policy(clipped)


# ---------------------------------------------------------------------------------- DDIM vs pipelines
@pytest.mark.parametrize("family, kind, guidance_scale", [
    ("sd15", "eps", 5.0), ("sd15", "v", 5.0), ("sd15", "eps", 1.0), ("sdxl", "eps", 5.0), ("sdxl", "v", 5.0),
    ("sd15", "lcm", 5.0),
])
def test_ddim_eta0_rollout_matches_the_pipeline(folders, family, kind, guidance_scale):
    """Deterministic DDIM through the adapter equals the diffusers pipeline with DDIMScheduler (eta 0),
    CFG included (one pass with the scale embedded for the guidance-distilled UNet); decoded images too."""
    folder, pipe = folders[family, kind]
    if kind == "v":
        pipe = load_pipeline(folder)  # a stock folder: what diffusers itself loads from it
    policy = make_policy(folder)
    perturb_lora(policy)  # the reference (adapters off) must be the base model
    latents, steps = initial_latents(policy, seed=4), 6
    expected = pipeline_sample(pipe, latents, steps, guidance_scale)
    with policy.reference():
        _, traj = rollout(policy, latents, steps, guidance_scale)
    assert traj.final.shape == expected.shape
    assert (traj.final - expected).abs().max() <= TOL
    assert (traj.final - latents).abs().max() > 0.1  # sampling went somewhere: the match is not trivial
    images = policy.decode(traj.final)
    expected_images = pipeline_sample(pipe, latents, steps, guidance_scale, "pt")
    assert images.shape == expected_images.shape == (1, 3, SIZE, SIZE)
    assert (images - expected_images).abs().max() <= 1e-4
    assert ((expected_images > 0.01) & (expected_images < 0.99)).float().mean() > 0.5  # mostly unclamped
    # Adapters on (perturbed): another model, another sample.
    _, tuned = rollout(policy, latents, steps, guidance_scale)
    assert (tuned.final - expected).abs().max() > 1e-3


def test_guidance_scale_matters_for_cfg_and_for_embedded_guidance(folders):
    for kind in ("eps", "lcm"):
        policy = make_policy(folders["sd15", kind][0])
        latents = initial_latents(policy, seed=5)
        a, b = (rollout(policy, latents, 3, g)[1].final for g in (1.0, 5.0))
        assert (a - b).abs().max() > 1e-3, kind


def test_guidance_embedding_is_the_lcm_pipelines():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 4.0, 7.5])
    for dim in (8, 9):
        expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        assert torch.equal(guidance_embedding(w, dim), expected)


# ----------------------------------------------------------------------------- schedule, predictions
def test_sigmas_are_the_ddim_schedulers_noise_scales(folders):
    policy = make_policy(folders["sd15", "eps"][0])
    steps = 10
    sigmas = policy.sigmas(steps)
    ac = policy.scheduler.alphas_cumprod
    # SD1.5: leading spacing with steps_offset 1, set_alpha_to_one False (the last step lands on abar_0).
    timesteps = torch.arange(9, -1, -1) * 100 + 1
    assert torch.equal(policy.scheduler.timesteps, timesteps)
    torch.testing.assert_close(sigmas, torch.cat([(1 - ac[timesteps]).sqrt(), (1 - ac[0]).sqrt().reshape(1)]))
    assert 0 < float(sigmas[-1]) < float(sigmas[-2])
    # predict() maps each noise scale back to its timestep exactly (integers), and between entries linearly.
    assert torch.equal(policy.timestep(sigmas[:-1]), timesteps.float())
    mid = (policy._noise_table[500] + policy._noise_table[501]) / 2
    assert 500 < float(policy.timestep(mid.reshape(1))) < 501


def test_uneven_spacing_warns_and_stays_one_chain(folders):
    policy = make_policy(folders["sd15", "eps"][0])
    policy.scheduler.register_to_config(timestep_spacing="linspace")
    with pytest.warns(UserWarning, match="not evenly spaced"):
        sigmas = policy.sigmas(4)
    assert torch.equal(policy.timestep(sigmas[:-1]), torch.tensor([999.0, 666.0, 333.0, 0.0]))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_predict_returns_epsilon_for_every_prediction_type(folders, prediction):
    """By hand from the raw UNet output u: eps = u; eps = sqrt(abar) u + s x; eps = (x - sqrt(abar) u) / s."""
    policy = make_policy(folders["sd15", "v"][0])
    policy.scheduler.register_to_config(prediction_type=prediction)
    x = initial_latents(policy, seed=6, batch=2)
    sigma = policy.sigmas(5)[[1, 3]]
    cond = policy.encode([PROMPT, "a blue square"])
    with torch.no_grad():
        eps = policy.predict(x, sigma, cond, 1.0)
        u = policy.unet(x, policy.timestep(sigma), encoder_hidden_states=cond.prompt_embeds).sample
    abar = policy.scheduler.alphas_cumprod[policy.scheduler.timesteps[[1, 3]]].reshape(2, 1, 1, 1)
    s = (1 - abar).sqrt()
    expected = {"epsilon": u, "v_prediction": abar.sqrt() * u + s * x, "sample": (x - abar.sqrt() * u) / s}[prediction]
    torch.testing.assert_close(eps, expected, rtol=1e-5, atol=1e-5)
    if prediction != "epsilon":
        assert (eps - u).abs().max() > 0.1


# ------------------------------------------------------------------------------- rollout and training
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_rollout_with_log_probs_and_one_training_step(folders, family):
    """DDPO's setting (eta 1): every step is stochastic (SD's last step lands on abar_0 < 1, so it has
    noise too); recomputed log-probs equal the rollout's; one optimizer step on a policy-gradient loss
    (with gradient checkpointing) changes the LoRA weights and nothing else."""
    policy = make_policy(folders[family, "v"][0], gradient_checkpointing=True)
    perturb_lora(policy, seed=1)
    latents, steps = initial_latents(policy, seed=7, batch=2), 4
    sampler, traj = rollout(policy, latents, steps, 5.0, eta=1.0, prompts=(PROMPT, "a blue square"))
    assert bool(traj.stochastic.all()) and traj.log_probs.shape == (2, steps)
    assert torch.isfinite(traj.log_probs).all()
    cond = policy.encode([PROMPT, "a blue square"])
    predict = lambda x, s, c: policy.predict(x, s, c, 5.0)  # noqa: E731
    for j in range(steps):
        with torch.no_grad():
            recomputed = sampler.log_prob(predict, traj, j, cond)[0]
        assert torch.equal(recomputed, traj.log_probs[:, j]), j  # the on-policy ratio is exactly 1

    frozen = {n: p.detach().clone() for n, p in policy.unet.named_parameters() if not p.requires_grad}
    text = {n: p.detach().clone() for e, _ in policy.text for n, p in e.named_parameters()}
    trainable = {n: p for n, p in policy.unet.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    policy.unet.train()
    advantages = torch.tensor([1.0, -1.0])
    loss = -sum((advantages * sampler.log_prob(predict, traj, j, cond)[0]).mean() for j in range(2))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in trainable.values())
    optimizer.step()
    assert all(not torch.equal(p, before[n]) for n, p in trainable.items())
    assert all(torch.equal(p, frozen[n]) for n, p in policy.unet.named_parameters() if not p.requires_grad)
    assert all(torch.equal(p, text[n]) for e, _ in policy.text for n, p in e.named_parameters())
    assert not any(p.requires_grad for p in policy.vae.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(folders):
    folder = folders["sdxl", "v"][0]
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same random LoRA A in both
        policy = make_policy(folder, gradient_checkpointing=checkpointing)
        assert policy.unet.is_gradient_checkpointing == checkpointing
        perturb_lora(policy, seed=2)
        policy.unet.train()
        x = initial_latents(policy, seed=8)
        policy.predict(x, policy.sigmas(4)[1:2], policy.encode([PROMPT]), 5.0).square().mean().backward()
        grads.append({n: p.grad for n, p in policy.unet.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-7)


def test_bfloat16_policy_predicts_and_trains(folders):
    """GPU dtype on CPU: bf16 base and text embeddings, fp32 LoRA, fp32 VAE (SDXL's force_upcast); the
    prediction is the fp32 policy's to bf16 precision and gradients reach the adapters."""
    folder = folders["sdxl", "v"][0]
    torch.manual_seed(0)
    reference = make_policy(folder)
    torch.manual_seed(0)
    policy = make_policy(folder, dtype="bfloat16")
    assert policy.unet.dtype == torch.bfloat16 and policy.vae.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in policy.unet.parameters() if p.requires_grad)
    perturb_lora(reference, seed=5)
    perturb_lora(policy, seed=5)
    x, sigma = initial_latents(policy, seed=12), policy.sigmas(4)[1:2]
    eps = policy.predict(x, sigma, policy.encode([PROMPT]), 5.0)
    assert eps.dtype == torch.float32
    with torch.no_grad():
        expected = reference.predict(x, sigma, reference.encode([PROMPT]), 5.0)
    assert (eps - expected).abs().max() <= 0.05 * expected.abs().max()
    eps.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in policy.unet.parameters() if p.requires_grad)
    assert policy.decode(x).shape == (1, 3, SIZE, SIZE)


def test_full_finetune_trains_every_unet_weight_against_a_frozen_reference(folders):
    policy = make_policy(folders["sd15", "v"][0], finetune="full")
    assert all(p.requires_grad for p in policy.unet.parameters())
    x, sigma, cond = initial_latents(policy, seed=9), policy.sigmas(4)[:1], policy.encode([PROMPT])
    with torch.no_grad():
        base = policy.predict(x, sigma, cond, 5.0)
        for p in policy.unet.parameters():
            p.add_(0.01)
        assert (policy.predict(x, sigma, cond, 5.0) - base).abs().max() > 1e-3
        with policy.reference():
            assert torch.equal(policy.predict(x, sigma, cond, 5.0), base)
    assert set(policy.trainable_state_dict()) == set(dict(policy.unet.named_parameters()))


def test_trainable_state_dict_round_trip(folders):
    folder = folders["sdxl", "v"][0]
    source, target = make_policy(folder), make_policy(folder)
    perturb_lora(source, seed=3)
    x, cond = initial_latents(source, seed=10), source.encode([PROMPT])
    sigma = source.sigmas(4)[:1]
    with torch.no_grad():
        assert not torch.equal(target.predict(x, sigma, cond, 5.0), source.predict(x, sigma, cond, 5.0))
        target.load_trainable_state_dict(source.trainable_state_dict())
        assert torch.equal(target.predict(x, sigma, cond, 5.0), source.predict(x, sigma, cond, 5.0))
    with pytest.raises(KeyError, match="lacks"):
        target.load_trainable_state_dict({"down_blocks.9.lora_A.default.weight": torch.zeros(1)})


# ------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_exports_load_back_in_diffusers(folders, family, tmp_path):
    """save_lora: the base pipeline + load_lora_weights samples what the policy samples; save_merged: a
    full folder that the pipeline loads on its own, for a LoRA and for a full fine-tune."""
    folder, _ = folders[family, "v"]
    torch.manual_seed(0)  # LoRA A's init
    policy = make_policy(folder)
    perturb_lora(policy, seed=4, scale=0.1)  # a LoRA the size training gives, not one that dominates the UNet
    latents, steps = initial_latents(policy, seed=11), 4
    ours = rollout(policy, latents, steps, 5.0)[1].final
    base = pipeline_sample(load_pipeline(folder), latents, steps, 5.0)
    assert (ours - base).abs().max() > 1e-3  # the LoRA matters, so matching it below is not trivial

    pipe = load_pipeline(folder)
    pipe.load_lora_weights(policy.save_lora(tmp_path / "lora"))
    pipe_out = pipeline_sample(pipe, latents, steps, 5.0)
    assert (pipe_out - ours).abs().max() <= TOL

    merged = load_pipeline(policy.save_merged(tmp_path / "merged"))
    assert not any("lora" in n for n, _ in merged.unet.named_parameters())
    assert (pipeline_sample(merged, latents, steps, 5.0) - ours).abs().max() <= TOL  # (W + s B A) x: other rounding

    full = make_policy(folder, finetune="full", needs_reference=False)
    with torch.no_grad():
        for p in full.unet.parameters():
            p.mul_(1.01)
    tuned = rollout(full, latents, steps, 5.0)[1].final
    assert (tuned - base).abs().max() > 1e-3
    assert (pipeline_sample(load_pipeline(full.save_merged(tmp_path / "full")), latents, steps, 5.0) - tuned).abs().max() <= TOL
    with pytest.raises(ValueError, match="save_lora needs model.finetune=lora"):
        full.save_lora(tmp_path / "nope")
    with pytest.raises(FileExistsError, match="not empty"):
        full.save_merged(tmp_path / "full")
