"""WanPolicy against the diffusers WanPipeline it replaces, on a tiny random Wan folder built from config."""
from __future__ import annotations

import json

import pytest
import torch

from models.wan import WanPolicy
from samplers.flow_sde import FlowSDESampler

SIZE = 32  # pixels; Wan's VAE divides by 8 -> 4x4 latents, 2x2 tokens per latent frame (patch 1x2x2)
FRAMES = 9  # 4x temporal VAE: (9 - 1) / 4 + 1 = 3 latent frames
TOKENS = 16  # UMT5 sequence length for both the policy and the pipeline
PROMPT = "a red circle"
NEGATIVE = "ice"


def build_tiny_wan(seed: int = 0):
    """A complete random WanPipeline: 2-block WanTransformer3DModel, 4-channel AutoencoderKLWan, 1-layer UMT5.

    Non-trivial latents_mean/std so decode's un-normalisation is exercised. The tokenizer is the tests'
    offline CLIP BPE (a UMT5 sentencepiece model cannot be built offline); the pipeline only calls it.
    """
    from conftest import _tiny_clip_tokenizer
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tok = _tiny_clip_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tok), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4, relative_attention_num_buckets=8,
        pad_token_id=1, eos_token_id=1, decoder_start_token_id=0)).eval()
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.05, 0.3],
                           latents_std=[1.5, 0.8, 2.0, 1.1])
    pipe = WanPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_wan")
    build_tiny_wan().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipeline(wan_dir):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(wan_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_policy(folder, finetune="lora", **kwargs):
    kwargs = {"negative_prompt": NEGATIVE, **kwargs}
    return WanPolicy(str(folder), finetune=finetune, lora_rank=4, lora_alpha=8.0, dtype="float32",
                     max_sequence_length=TOKENS, num_frames=FRAMES, height=SIZE, width=SIZE, **kwargs)


def perturb_lora(policy, seed=0):
    """Non-zero LoRA B everywhere (gaussian init leaves B = 0: a fresh adapter is the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        names = [n for n, p in policy.transformer.named_parameters() if "lora_B" in n]
        for name, p in policy.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    assert names


def initial_latents(policy, seed=0):
    shape = policy.latent_shape(SIZE, SIZE)
    assert shape == (4, 3, SIZE // 8, SIZE // 8)
    return torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed))


def ode_sample(policy, latents, num_steps, guidance_scale):
    cond = policy.encode([PROMPT])
    return FlowSDESampler(noise_level=0.0).rollout(
        lambda x, sigma, c: policy.predict(x, sigma, c, guidance_scale), latents, policy.sigmas(num_steps), cond,
        [torch.Generator()], torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
    ).final


def pipeline_sample(pipe, latents, num_steps, guidance_scale, output_type):
    return pipe(PROMPT, negative_prompt=NEGATIVE, latents=latents.clone(), num_inference_steps=num_steps,
                guidance_scale=guidance_scale, output_type=output_type, height=SIZE, width=SIZE, num_frames=FRAMES,
                max_sequence_length=TOKENS).frames


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_ode_rollout_matches_wan_pipeline(wan_dir, pipeline, guidance_scale):
    """CFG against the negative prompt (and CFG-free at 1.0) as WanPipeline; decode = its "pt" frames."""
    policy = make_policy(wan_dir)
    perturb_lora(policy)
    latents, steps = initial_latents(policy), 5
    expected = pipeline_sample(pipeline, latents, steps, guidance_scale, "latent")
    with policy.reference():
        final = ode_sample(policy, latents, steps, guidance_scale)
    assert final.shape == expected.shape
    assert (final - expected).abs().max() <= 1e-5
    assert (final - latents).abs().max() > 0.1  # sampling went somewhere: the match is not trivial
    video = policy.decode(final)
    expected_video = pipeline_sample(pipeline, latents, steps, guidance_scale, "pt")
    assert video.shape == expected_video.shape == (1, FRAMES, 3, SIZE, SIZE)
    assert (video - expected_video).abs().max() <= 1e-5
    # Adapters on (perturbed): another model, another sample.
    assert (ode_sample(policy, latents, steps, guidance_scale) - expected).abs().max() > 1e-3


def test_negative_prompt_matters(wan_dir):
    """The negative prompt really enters CFG (a policy with another one samples differently)."""
    a, b = make_policy(wan_dir), make_policy(wan_dir, negative_prompt="")
    latents = initial_latents(a, seed=3)
    assert (ode_sample(a, latents, 3, 5.0) - ode_sample(b, latents, 3, 5.0)).abs().max() > 1e-4


def test_full_finetune_matches_pipeline_and_keeps_reference(wan_dir, pipeline):
    policy = make_policy(wan_dir, finetune="full")
    latents = initial_latents(policy, seed=1)
    expected = pipeline_sample(pipeline, latents, 4, 5.0, "latent")
    assert (ode_sample(policy, latents, 4, 5.0) - expected).abs().max() <= 1e-5
    with torch.no_grad():
        for p in policy.transformer.parameters():
            p.add_(0.05)
    assert (ode_sample(policy, latents, 4, 5.0) - expected).abs().max() > 1e-3
    with policy.reference():
        assert (ode_sample(policy, latents, 4, 5.0) - expected).abs().max() <= 1e-5


def test_sigmas_are_the_schedulers_and_flow_shift_overrides(wan_dir, pipeline):
    policy = make_policy(wan_dir)
    pipeline.scheduler.set_timesteps(6)
    assert torch.equal(policy.sigmas(6), pipeline.scheduler.sigmas.float())
    shifted = make_policy(wan_dir, flow_shift=5.0).sigmas(6)
    shift = lambda s, k: k * s / (1 + (k - 1) * s)  # noqa: E731
    unshifted = torch.linspace(1.0, shift(1e-3, 5.0), 6)  # uniform in sigma before the shift
    torch.testing.assert_close(shifted[:-1], shift(unshifted, 5.0))


def test_bad_folders_and_knobs_raise(tmp_path, wan_dir):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "model_index.json")):
        WanPolicy(str(tmp_path))
    with pytest.raises(ValueError, match="'lora' or 'full'.*'bad'"):
        make_policy(wan_dir, finetune="bad")
    with pytest.raises(ValueError, match=r"num_frames \(8\) - 1 must be divisible by .* 4.*height \(20\)"):
        WanPolicy(str(wan_dir), num_frames=8, height=20, width=SIZE, max_sequence_length=TOKENS)
    two_expert = tmp_path / "a14b"
    two_expert.mkdir()
    index = json.loads((wan_dir / "model_index.json").read_text())
    (two_expert / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": 0.875}))
    with pytest.raises(ValueError, match="two-expert Wan 2.2"):
        WanPolicy(str(two_expert))


def test_rollout_log_probs_and_one_training_step(wan_dir):
    """An SDE rollout's stored log-probs are recomputed exactly (ratio 1), and one LoRA step changes them."""
    policy = make_policy(wan_dir)
    sampler = FlowSDESampler(noise_level=0.7)
    cond = policy.encode([PROMPT, "a blue square"])
    sigmas = policy.sigmas(4)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    x_T = torch.stack([torch.randn(policy.latent_shape(SIZE, SIZE), generator=g) for g in gens])
    predict = lambda x, s, c: policy.predict(x, s, c, 1.0)  # noqa: E731 (CFG-free training)
    with torch.no_grad():
        traj = sampler.rollout(predict, x_T, sigmas, cond, gens, torch.arange(2), torch.zeros(2, dtype=torch.long))
    assert traj.final.shape == (2, 4, 3, 4, 4) and torch.isfinite(traj.log_probs).all()
    steps = traj.stochastic[0].nonzero().flatten()
    assert len(steps) > 0
    def log_probs():
        return torch.stack([sampler.log_prob(predict, traj, int(j), cond)[0] for j in steps], 1)

    logp = log_probs()
    assert torch.equal(logp.detach(), traj.log_probs[:, steps])  # on-policy ratio exactly 1
    trainable = [p for p in policy.transformer.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    (-logp.sum()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    opt.step()
    assert any(not torch.equal(p, b) for p, b in zip(trainable, before))
    with torch.no_grad():
        assert (log_probs() - logp.detach()).abs().max() > 1e-6
    video = policy.decode(traj.final)
    assert video.shape == (2, FRAMES, 3, SIZE, SIZE) and 0 <= video.min() and video.max() <= 1


def test_export_round_trip(wan_dir, tmp_path):
    """save_lora loads into WanPipeline.load_lora_weights, save_merged into WanPipeline.from_pretrained,
    and both reproduce the tuned policy's samples."""
    from diffusers import WanPipeline

    policy = make_policy(wan_dir)
    perturb_lora(policy, seed=4)
    latents = initial_latents(policy, seed=5)
    tuned = ode_sample(policy, latents, 3, 5.0)
    with policy.reference():
        base = ode_sample(policy, latents, 3, 5.0)
    assert (tuned - base).abs().max() > 1e-3

    pipe = WanPipeline.from_pretrained(wan_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(policy.save_lora(tmp_path / "lora"))
    assert (pipeline_sample(pipe, latents, 3, 5.0, "latent") - tuned).abs().max() <= 1e-5

    merged = WanPipeline.from_pretrained(policy.save_merged(tmp_path / "merged"))
    merged.set_progress_bar_config(disable=True)
    assert (pipeline_sample(merged, latents, 3, 5.0, "latent") - tuned).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="overwrite the base"):
        policy.save_merged(wan_dir)

    full = make_policy(wan_dir, finetune="full", needs_reference=False)
    with pytest.raises(ValueError, match="no LoRA to save"):
        full.save_lora(tmp_path / "nolora")


def test_trainable_state_dict_round_trip(wan_dir):
    source, target = make_policy(wan_dir), make_policy(wan_dir)
    perturb_lora(source, seed=1)
    state = source.trainable_state_dict()
    assert state and all("lora_" in k for k in state)
    target.load_trainable_state_dict(state)
    latents = initial_latents(source, seed=2)
    assert torch.equal(ode_sample(target, latents, 2, 5.0), ode_sample(source, latents, 2, 5.0))
    with pytest.raises(KeyError, match="lacks"):
        target.load_trainable_state_dict({"blocks.99.attn1.to_q.lora_A.default.weight": torch.zeros(1)})
