"""Reward backpropagation (DRaFT-K / AlignProp): the loss against hand-computed values, gradients only
through the last K steps (closed form and finite differences), exact replay of stored rollouts,
checkpointing on/off, and the config rules."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from models.sd3 import SD3Policy
from samplers.flow_sde import FlowSDESampler
from samplers.ode import ODESampler
from trainer.algorithms.base import Batch, Context
from trainer.algorithms.reward_backprop import (
    RewardBackprop, RewardBackpropConfig, decode_with_grad, replay, rollout_noise, step_arithmetic, trained_rewards,
    truncation_steps,
)
from trainer.config import ConfigError, register, validate
from trainer.rollout import rollout_chunks

CONF = Path(__file__).resolve().parents[3] / "conf"
SIGMAS = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])  # S = 4 steps, dt = -0.25 each
THETA = torch.tensor([0.3, -0.2, 0.5, 0.8])  # the tiny policy's per-step velocity gain

register()


class GainPolicy:
    """v = theta_j * x at step j (found from sigma): Euler steps are x_{j+1} = (1 + dt_j theta_j) x_j.

    Pixel space, images = clamp(x / 2 + 0.5), differentiable like every adapter's decode.
    """

    device = torch.device("cpu")

    def __init__(self):
        self.theta = torch.nn.Parameter(THETA.clone())

    def predict(self, x, sigma, cond, guidance_scale):
        j = (SIGMAS[None] - sigma[:, None]).abs().argmin(1)
        return self.theta[j].reshape(-1, 1, 1, 1) * x + cond

    def encode(self, prompts):
        return torch.zeros(len(prompts), 1, 1, 1)

    def decode(self, latents):
        return (latents / 2 + 0.5).clamp(0, 1)


class Stat:
    """A differentiable image statistic: mean of images ** power."""

    differentiable = True

    def __init__(self, power):
        self.power = power

    def __call__(self, images, prompts, metadata=None):
        return {"reward": (images**self.power).mean(dim=(1, 2, 3))}


class NotDifferentiable:
    differentiable = False

    def __call__(self, images, prompts, metadata=None):
        raise AssertionError("a monitor (weight 0) must not be called by the update")


class Recorder:
    """Stands in for the Stepper: backward without DeepSpeed, losses and stats kept."""

    def __init__(self):
        self.losses, self.stats = [], []

    def backward(self, loss, stats=None):
        self.losses.append(loss.detach())
        self.stats.append(stats)
        loss.backward()


def make_rollout(sampler, policy, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_T = 0.3 * torch.randn(B, 3, 2, 2, generator=g)  # small: no pixel reaches the clamp
    gens = [torch.Generator().manual_seed(100 + i) for i in range(B)]
    with torch.no_grad():
        traj = sampler.rollout(lambda x, s, c: policy.predict(x, s, c, 1.0), x_T, SIGMAS, policy.encode([""] * B), gens,
                               torch.zeros(B, dtype=torch.long), torch.arange(B))
    return traj, x_T


def make_ctx(policy, sampler, rewards, weights, micro_batch=2, seed=0):
    cfg = SimpleNamespace(seed=seed, train=SimpleNamespace(micro_batch=micro_batch))
    ensemble = SimpleNamespace(rewards=rewards, weights=weights)
    stepper = Recorder()
    ctx = Context(cfg, policy, sampler, ensemble, None, SimpleNamespace(rank=0), ["the digit one"], 0, stepper)
    return ctx, stepper


def make_batch(traj, micro_batch=2):
    B = len(traj)
    return Batch([traj[i : i + micro_batch] for i in range(0, B, micro_batch)], torch.zeros(B, 3, 2, 2), None,
                 traj.prompt_ids, traj.sample_ids, ["the digit one"] * B, [{}] * B)


TWO_REWARDS = {"bright": Stat(1), "square": Stat(2), "monitor": NotDifferentiable()}
TWO_WEIGHTS = {"bright": 2.0, "square": -0.5, "monitor": 0.0}


def hand_loss_and_grad(x_T, k, loss_scale=1.0):
    """Closed form for Euler on GainPolicy: x_S = x_T prod_j (1 + dt theta_j); loss = -scale *
    mean_b (2 mean(img) - 0.5 mean(img^2)) per chunk of 2; d img / d theta_j = x_S dt / (2 (1 + dt theta_j))
    for the last k steps, 0 before (the first S - k steps are not differentiated)."""
    dt = SIGMAS[1:] - SIGMAS[:-1]
    x_S = x_T * torch.prod(1 + dt * THETA)
    img = x_S / 2 + 0.5
    losses = [-loss_scale * (2 * img[c].mean() - 0.5 * (img[c] ** 2).mean()) for c in (slice(0, 2), slice(2, 4))]
    n = img[0].numel()
    d_loss_d_img = -loss_scale * (2 - img) / (2 * n)  # per chunk of 2: mean over b and pixels
    grad = torch.zeros(4)
    for j in range(4 - k, 4):
        grad[j] = (d_loss_d_img * x_S * dt[j] / (2 * (1 + dt[j] * THETA[j]))).sum()
    return losses, grad


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_loss_and_gradients_match_the_closed_form(k, checkpointing):
    policy = GainPolicy()
    sampler = ODESampler(num_steps=4, guidance_scale=1.0)
    traj, x_T = make_rollout(sampler, policy)
    ctx, stepper = make_ctx(policy, sampler, TWO_REWARDS, TWO_WEIGHTS)
    algo = RewardBackprop(RewardBackpropConfig(last_k=k, checkpointing=checkpointing, loss_scale=1.5))
    assert algo.micro_steps(n_chunks=2, n_stochastic=0) == 2
    metrics = algo.update(make_batch(traj), ctx)
    assert metrics == {"train/truncation_k": float(k)}
    losses, grad = hand_loss_and_grad(x_T, k, loss_scale=1.5)
    assert len(stepper.losses) == 2
    for got, want in zip(sorted(stepper.losses), sorted(losses)):
        assert float(got) == pytest.approx(float(want), rel=1e-5)
    for stats in stepper.stats:
        assert float(stats["replay_dev"]) == 0.0  # the ODE re-run is the rollout, bit for bit
    torch.testing.assert_close(policy.theta.grad, grad, rtol=1e-4, atol=1e-7)
    assert torch.all(policy.theta.grad[: 4 - k] == 0) and torch.all(policy.theta.grad[4 - k :] != 0)


def test_stochastic_replay_follows_the_rollout_and_matches_finite_differences():
    policy = GainPolicy()
    sampler = FlowSDESampler(noise_level=0.7, num_steps=4, guidance_scale=1.0)
    traj, _ = make_rollout(sampler, policy)
    assert bool(traj.stochastic.all())
    predict = lambda x, s, c: policy.predict(x, s, c, 1.0)  # noqa: E731
    cond = policy.encode([""] * len(traj))
    chain = step_arithmetic(sampler)
    noise = rollout_noise(chain, predict, traj, cond, 1)
    assert sorted(noise) == [1, 2, 3]
    xs = replay(chain, predict, traj, cond, 1, noise, checkpointing=True)
    torch.testing.assert_close(xs, traj.latents[:, 1:], rtol=0, atol=1e-6)  # the rollout's path, to rounding

    def loss_of(theta):
        with torch.no_grad():
            policy.theta.copy_(theta)
            final = replay(chain, predict, traj, cond, 1, noise, checkpointing=False)[:, -1]
            policy.theta.copy_(THETA)
        images = (final / 2 + 0.5).clamp(0, 1)
        return -(2 * images.mean() - 0.5 * (images**2).mean()).double()

    ctx, stepper = make_ctx(policy, sampler, TWO_REWARDS, TWO_WEIGHTS, micro_batch=4)
    RewardBackprop(RewardBackpropConfig(last_k=3)).update(make_batch(traj, micro_batch=4), ctx)
    assert float(stepper.stats[0]["replay_dev"]) < 1e-6
    grad = policy.theta.grad
    assert grad[0] == 0
    h = 1e-3
    for j in (1, 2, 3):
        e = torch.zeros(4)
        e[j] = h
        numeric = (loss_of(THETA + e) - loss_of(THETA - e)) / (2 * h)
        assert float(grad[j]) == pytest.approx(float(numeric), rel=2e-2, abs=1e-6), j


def test_a_trained_reward_that_is_not_differentiable_is_an_error():
    policy = GainPolicy()
    sampler = ODESampler(num_steps=4, guidance_scale=1.0)
    traj, _ = make_rollout(sampler, policy)
    ctx, _ = make_ctx(policy, sampler, TWO_REWARDS, {**TWO_WEIGHTS, "monitor": 1.0})
    with pytest.raises(ValueError, match=r"\['monitor'\] are trained .* not differentiable"):
        RewardBackprop(RewardBackpropConfig()).update(make_batch(traj), ctx)
    assert [n for n, _, _ in trained_rewards(SimpleNamespace(rewards=TWO_REWARDS, weights=TWO_WEIGHTS))] == ["bright", "square"]


def test_random_truncation_draws_k_per_iteration_from_the_training_stream():
    policy, sampler = GainPolicy(), ODESampler(num_steps=4, guidance_scale=1.0)
    cfg = RewardBackpropConfig(last_k=4, truncation="random")
    ks = []
    for step in range(40):
        ctx, _ = make_ctx(policy, sampler, TWO_REWARDS, TWO_WEIGHTS)
        ctx.step = step
        ks.append(truncation_steps(cfg, ctx))
        assert truncation_steps(cfg, ctx) == ks[-1]  # a pure function of (seed, step): the same on every rank
    assert set(ks) == {1, 2, 3, 4}
    ctx.cfg.seed = 1
    assert [truncation_steps(cfg, ctx) for _ in range(3)] == [truncation_steps(cfg, ctx)] * 3


def test_decode_with_grad_reaches_the_latents_and_refuses_a_detaching_decode():
    latents = torch.full((1, 3, 2, 2), 0.2, requires_grad=True)
    images = decode_with_grad(GainPolicy(), latents)
    (grad,) = torch.autograd.grad(images.sum(), latents)
    assert torch.all(grad == 0.5)

    class Frozen(GainPolicy):
        def decode(self, latents):  # detaches: no graph to the latents
            return (latents.detach() / 2 + 0.5).clamp(0, 1)

    with pytest.raises(RuntimeError, match="without a graph"):
        decode_with_grad(Frozen(), latents)


# --- the real adapter: a tiny SD3 (with a VAE) ------------------------------------------------------


@pytest.fixture(scope="module")
def sd3(tiny_sd3_dir):
    policy = SD3Policy(str(tiny_sd3_dir), lora_rank=4, lora_alpha=8.0, dtype="float32", max_sequence_length=16,
                       height=16, width=16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero LoRA B: gradients reach every adapter weight
        for name, p in policy.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return policy


def _lora_grads(policy):
    return {n: p.grad.clone() for n, p in policy.transformer.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("solver", ["euler", "dpm2"])
def test_ode_replay_reproduces_the_stored_latents_and_checkpointing_keeps_the_gradients(sd3, solver):
    sampler = ODESampler(num_steps=4, guidance_scale=2.0, ode_solver=solver)
    prompts = ["a red circle", "a blue square"]
    chunks, images = rollout_chunks(sd3, sampler, prompts, torch.tensor([0, 1]), torch.tensor([0, 0]), (0, 1, 0), 4,
                                    2.0, 2, 16, 16)
    traj = chunks[0]
    predict = lambda x, s, c: sd3.predict(x, s, c, 2.0)  # noqa: E731
    cond = sd3.encode(prompts)
    chain = step_arithmetic(sampler)
    # Every step re-run with gradients (K = S): still the rollout, bit for bit (dpm2 needs pred_x0 of the step before).
    for start in (0, 2):
        xs = replay(chain, predict, traj, cond, start, {}, checkpointing=True)
        assert xs.requires_grad and torch.equal(xs.detach(), traj.latents[:, start:])
    reward = Stat(1)
    grads = []
    for checkpointing in (False, True):
        sd3.transformer.zero_grad(set_to_none=True)
        final = replay(chain, predict, traj, cond, 2, {}, checkpointing)[:, -1]
        decoded = decode_with_grad(sd3, final)
        torch.testing.assert_close(decoded.detach(), images, rtol=0, atol=1e-6)  # the rollout's images
        (-reward(decoded, prompts)["reward"].mean()).backward()
        grads.append(_lora_grads(sd3))
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    assert any(float(g.abs().max()) > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-8, msg=name)


# --- config rules -----------------------------------------------------------------------------------


def _config(*overrides):
    """The shapes toy without its experiment file (whose GRPO knobs this schema does not have)."""
    base = ["experiment=none", "model=toy_shapes", "data=shapes", "algorithm=reward_backprop", "sampler=ode"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return OmegaConf.to_object(compose("train", overrides=base + list(overrides)))


def test_config_accepts_differentiable_rewards_and_monitors():
    cfg = _config("+reward@rewards.bright=brightness", "rewards.bright.weight=1", "+reward@rewards.jpeg=jpeg_compressibility",
                  "rewards.jpeg.weight=0", "algorithm.truncation=random", "algorithm.last_k=3")
    assert isinstance(cfg.algorithm, RewardBackpropConfig)
    validate(cfg, world_size=1)


def test_config_rejects_a_trained_nondifferentiable_reward_and_bad_knobs():
    cfg = _config("+reward@rewards.jpeg=jpeg_compressibility", "algorithm.truncation=sometimes", "algorithm.last_k=11",
                  "algorithm.loss_scale=0", "aggregate=pareto")
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=1)
    problems = err.value.problems
    assert any("rewards.jpeg (rewards.jpeg.JpegCompressibility) is not differentiable" in p and "rewards.jpeg.weight=0" in p
               for p in problems), problems
    for key in ("algorithm.truncation", "algorithm.last_k (11) must be in 1..10, the steps of a rollout", "algorithm.loss_scale", "aggregate"):
        assert any(key in p for p in problems), (key, problems)
