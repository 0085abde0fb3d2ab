"""Checks every model-family adapter must pass, called by each family's test module with its tiny model
and its diffusers pipeline (tests/unit/models/test_flux.py, test_qwen_image.py)."""
from __future__ import annotations

import math

import torch

from samplers.flow_sde import FlowSDESampler
from trainer.rollout import rollout_chunks

TOL = 1e-5  # max abs difference from the diffusers pipeline (the bound)
PROMPTS = ["a red circle", "two blue squares on the left"]


def perturb_lora(policy, seed=0, scale=0.5):
    """Give every LoRA B a non-zero value (gaussian init leaves B = 0: the adapter starts as identity)."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in policy.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))
                n += 1
    assert n > 0, "no LoRA weights found"


def perturb_all(policy, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.transformer.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def initial_latents(policy, batch=1, seed=0):
    shape = policy.latent_shape(policy.height, policy.width)
    return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed))


def ode_sample(policy, latents, num_steps, guidance_scale, prompts=PROMPTS[:1]):
    """Final latents [B, C, h, w] of the deterministic sampler (FlowSDE at noise 0 is Euler's ODE)."""
    sampler = FlowSDESampler(noise_level=0.0)
    b = latents.shape[0]
    with torch.no_grad():
        traj = sampler.rollout(
            lambda x, sigma, c: policy.predict(x, sigma, c, guidance_scale), latents, policy.sigmas(num_steps),
            policy.encode(prompts), [torch.Generator()] * b, torch.zeros(b, dtype=torch.long), torch.arange(b),
        )
    return traj.final


def sde_rollout(policy, guidance_scale, num_steps=4):
    """The trainer's rollout (trainer.rollout.rollout_chunks) of 2 prompts x 2 samples, 2 per chunk."""
    sampler = FlowSDESampler(noise_level=0.7, num_steps=num_steps)
    pids, sids = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        chunks, images = rollout_chunks(policy, sampler, PROMPTS, pids, sids, (0, 0, 0), num_steps, guidance_scale,
                                        micro_batch=2, height=policy.height, width=policy.width)
    return sampler, chunks, images


def check_rollout_log_probs(policy, guidance_scale):
    """Images in [0, 1]; each stochastic step's stored log-prob is the Gaussian density of the stored
    transition and is recomputed bitwise by sampler.log_prob (on-policy ratio exactly 1)."""
    sampler, chunks, images = sde_rollout(policy, guidance_scale)
    assert images.shape == (4, 3, policy.height, policy.width)
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 1e-3
    assert not torch.equal(images[0], images[1])  # two samples of one prompt differ (their own noise)
    traj = chunks[1]
    steps = traj.stochastic[0].nonzero().flatten().tolist()
    assert steps, "no stochastic step"
    assert torch.all(traj.log_probs[:, ~traj.stochastic[0]] == 0)
    cond = policy.encode([PROMPTS[int(p)] for p in traj.prompt_ids])
    for j in steps:
        lp, mean, std = sampler.log_prob(lambda x, s, c: policy.predict(x, s, c, guidance_scale), traj, j, cond)
        assert torch.equal(lp.detach(), traj.log_probs[:, j]), j
        # Flow-GRPO's mean-reduced Gaussian log-density, written out.
        x_next, std = traj.latents[:, j + 1], std.reshape(-1, 1, 1, 1)
        density = -((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
        torch.testing.assert_close(traj.log_probs[:, j], density.detach().flatten(1).mean(1), rtol=1e-5, atol=1e-5)
    return sampler, chunks


def _frozen_state(policy):
    """Every weight that must not train: the transformer's frozen ones and the other components."""
    state = {f"transformer.{k}": v.detach().clone() for k, v in policy.transformer.named_parameters() if not v.requires_grad}
    for name, module in vars(policy).items():
        if isinstance(module, torch.nn.Module) and module is not policy.transformer:
            state.update({f"{name}.{k}": v.detach().clone() for k, v in module.state_dict().items()})
    return state


def check_training_step(policy, guidance_scale):
    """One policy-gradient step on a rollout's log-probs changes the trained weights and nothing else;
    the reference prediction stays the base model's."""
    sampler, chunks = check_rollout_log_probs(policy, guidance_scale)
    traj = chunks[0]
    cond = policy.encode([PROMPTS[int(p)] for p in traj.prompt_ids])
    x, sigma = traj.latents[:, 1], traj.sigmas[:, 1]
    with torch.no_grad(), policy.reference():
        ref_before = policy.predict(x, sigma, cond, guidance_scale)
    with torch.no_grad():
        before = policy.predict(x, sigma, cond, guidance_scale)
    frozen = _frozen_state(policy)
    trainable = {k: v.detach().clone() for k, v in policy.transformer.named_parameters() if v.requires_grad}
    assert trainable, "nothing trains"
    # No weight decay: a weight moves exactly when its gradient is non-zero.
    opt = torch.optim.AdamW([p for p in policy.transformer.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    j = int(traj.stochastic[0].nonzero()[0])
    lp, _, _ = sampler.log_prob(lambda x, s, c: policy.predict(x, s, c, guidance_scale), traj, j, cond)
    advantages = torch.tensor([1.0, -1.0])
    (-(advantages * torch.exp(lp - traj.log_probs[:, j])).mean()).backward()
    opt.step()
    graded = {k for k, v in policy.transformer.named_parameters() if v.grad is not None and bool(v.grad.abs().max() > 0)}
    changed = {k for k, v in policy.transformer.named_parameters() if v.requires_grad and not torch.equal(v, trainable[k])}
    assert changed == graded
    # Most weights get a gradient: with LoRA, B does at once (A's is zero while B = 0); weights whose
    # output the image never sees (the last block's text-stream output in an MMDiT) get none.
    lora_b = {k for k in trainable if "lora_B" in k}
    expected = lora_b or set(trainable)
    assert len(changed & expected) > len(expected) / 2, f"{len(changed & expected)} of {len(expected)} weights moved"
    after = _frozen_state(policy)
    moved = [k for k in frozen if not torch.equal(frozen[k], after[k])]
    assert not moved, moved[:5]
    with torch.no_grad():
        assert (policy.predict(x, sigma, cond, guidance_scale) - before).abs().max() > 1e-6
        with policy.reference():
            assert torch.equal(policy.predict(x, sigma, cond, guidance_scale), ref_before)


def check_gradient_checkpointing(make_policy, guidance_scale):
    """Checkpointed blocks give the same gradients as stored activations."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA A init in both policies
        policy = make_policy(gradient_checkpointing=checkpointing)
        perturb_lora(policy)
        x = initial_latents(policy, batch=2)
        out = policy.predict(x, torch.tensor([0.8, 0.3]), policy.encode(PROMPTS), guidance_scale)
        out.float().square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in policy.transformer.named_parameters() if p.grad is not None})
        assert policy.transformer.is_gradient_checkpointing == checkpointing
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-6)


def check_state_dict_round_trip(make_policy):
    source = make_policy()
    perturb_lora(source, seed=1)
    state = source.trainable_state_dict()
    assert state and all("lora_" in k for k in state)
    target = make_policy()
    x = initial_latents(source, batch=2)
    cond = source.encode(PROMPTS)

    def predict(policy):
        with torch.no_grad():
            return policy.predict(x, torch.tensor([0.9, 0.4]), cond, 2.0)

    assert not torch.equal(predict(target), predict(source))
    target.load_trainable_state_dict(state)
    assert torch.equal(predict(target), predict(source))
    bad = {**state, "transformer_blocks.99.attn.to_q.lora_A.default.weight": torch.zeros(4, 4)}
    try:
        make_policy().load_trainable_state_dict(bad)
    except KeyError as e:
        assert "transformer_blocks.99" in str(e)
    else:
        raise AssertionError("an unknown key was accepted")


def check_export(policy, pipeline_cls, base_folder, run_pipeline, guidance_scale, tmp_path, steps=4):
    """save_lora: the family pipeline with load_lora_weights reproduces the trained policy; save_merged:
    the pipeline loaded from the merged folder does. ``run_pipeline(pipe, latents, steps)`` returns the
    pipeline's final latents unpacked to [B, C, h, w]."""
    latents = initial_latents(policy, seed=3)
    base = run_pipeline(pipeline_cls.from_pretrained(base_folder), latents, steps)
    ours = ode_sample(policy, latents, steps, guidance_scale)
    assert (ours - base).abs().max() > 1e-3, "the trained policy must differ from the base for the test to mean anything"
    if policy.weights.finetune == "lora":
        pipe = pipeline_cls.from_pretrained(base_folder)
        pipe.load_lora_weights(policy.save_lora(tmp_path / "lora"))
        assert (run_pipeline(pipe, latents, steps) - ours).abs().max() <= TOL
    merged = policy.save_merged(tmp_path / "merged")
    assert (run_pipeline(pipeline_cls.from_pretrained(merged), latents, steps) - ours).abs().max() <= TOL
    # The base folder is untouched (the merged one links its other components, never writes into them).
    assert torch.equal(run_pipeline(pipeline_cls.from_pretrained(base_folder), latents, steps), base)


def check_bf16(policy, guidance_scale, tmp_path):
    """dtype=bfloat16 (what "auto" picks on GPU): bf16 base weights and encoders, fp32 adapters; a rollout
    in [0, 1] with finite log-probs recomputed bitwise, finite fp32 gradients on the adapters, and a
    merged export in bf16 (the base's dtype)."""
    assert policy.dtype == torch.bfloat16
    dtypes = {p.dtype for n, p in policy.transformer.named_parameters() if "lora_" not in n}
    assert dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in policy.transformer.parameters() if p.requires_grad)
    encoders = [m for m in vars(policy).values() if isinstance(m, torch.nn.Module) and m is not policy.transformer]
    assert len(encoders) >= 2 and all(p.dtype == torch.bfloat16 for m in encoders for p in m.parameters())
    sampler, chunks = check_rollout_log_probs(policy, guidance_scale)
    traj = chunks[0]
    assert torch.isfinite(traj.log_probs).all() and traj.latents.dtype == torch.float32
    cond = policy.encode([PROMPTS[int(p)] for p in traj.prompt_ids])
    lp, _, _ = sampler.log_prob(lambda x, s, c: policy.predict(x, s, c, guidance_scale), traj, 0, cond)
    lp.mean().backward()
    grads = [p.grad for p in policy.transformer.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert max(float(g.abs().max()) for g in grads) > 0
    from safetensors.torch import load_file

    perturb_lora(policy, scale=0.1)
    merged = policy.save_merged(tmp_path / "merged")
    weights = load_file(merged / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    assert not any("lora" in k for k in weights)


def compose_model(config: str, folder, overrides: list[str]):
    """The adapter built from conf/model/<config>.yaml as the trainer builds it (hydra compose + instantiate)."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from trainer.config import register

    conf = Path(__file__).resolve().parents[3] / "conf"
    assert (conf / "model" / f"{config}.yaml").read_text().startswith("# "), "config files start with a header comment"
    register()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=[f"model={config}", f"model.path={folder}", *overrides]))
    return instantiate(cfg.model, device="cpu", needs_reference=False)
