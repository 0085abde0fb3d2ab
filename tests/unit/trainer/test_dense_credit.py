"""The dense per-step credit family (trainer/algorithms/dense.py) against hand-computed values on tiny batches:
DenseGRPO's per-step gains and advantages, TP-GRPO's turning points, the dual-reward mix, the ODE completion
(against a deterministic rollout of the same noise), and the config rules, composed the way users compose them."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

from models.sd3 import SD3Policy
from samplers.flow_sde import FlowSDESampler
from samplers.guidance import LatentTarget
from samplers.trajectory import Trajectory
from trainer.algorithms.base import Batch
from trainer.algorithms.dense import (
    DualGRPO, clean_values, mixed_advantages, ode_complete, process_values, step_gains, stepwise_advantages,
    turning_point_rewards,
)
from trainer.config import ConfigError, register, validate
from trainer.rollout import rollout_chunks

CONF = Path(__file__).resolve().parents[3] / "conf"
EPS = 1e-4  # trainer.advantages.group_advantages' guard against a zero std
nan = float("nan")

register()


# ------------------------------------------------------------------------ DenseGRPO: gains, advantages
# 6 samples, prompts interleaved (grouping must follow the ids, not positions), S = 2 steps, both stochastic.
PIDS = torch.tensor([0, 1, 0, 1, 0, 1])
VALUES = torch.tensor([
    [0.0, 1.0, 3.0],  # p0: gains [1, 2]
    [1.0, 1.0, 1.0],  # p1: [0, 0]
    [0.0, 2.0, 2.0],  # p0: [2, 0]
    [2.0, 0.0, 4.0],  # p1: [-2, 4]
    [1.0, 1.0, 2.0],  # p0: [0, 1]
    [0.0, 1.0, 1.0],  # p1: [1, 0]
])
GAINS = torch.tensor([[1.0, 2.0], [0.0, 0.0], [2.0, 0.0], [-2.0, 4.0], [0.0, 1.0], [1.0, 0.0]])


def test_step_gains_are_the_reward_differences_on_stochastic_steps_only():
    torch.testing.assert_close(step_gains(VALUES, torch.tensor([True, True])), GAINS)
    got = step_gains(VALUES, torch.tensor([False, True]))
    assert torch.isnan(got[:, 0]).all()
    torch.testing.assert_close(got[:, 1], GAINS[:, 1])


def test_stepwise_advantages_normalise_each_step_within_its_group():
    # step 0: p0 gains [1, 2, 0]: mean 1, population std sqrt(2/3);  p1 gains [0, -2, 1]: mean -1/3, std sqrt(14/9)
    # step 1: p0 gains [2, 0, 1]: mean 1, std sqrt(2/3);              p1 gains [0, 4, 0]: mean 4/3, std sqrt(32/9)
    s23, s149, s329 = math.sqrt(2 / 3), math.sqrt(14 / 9), math.sqrt(32 / 9)
    want = torch.tensor([
        [0 / (s23 + EPS), 1 / (s23 + EPS)],
        [(1 / 3) / (s149 + EPS), (-4 / 3) / (s329 + EPS)],
        [1 / (s23 + EPS), -1 / (s23 + EPS)],
        [(-5 / 3) / (s149 + EPS), (8 / 3) / (s329 + EPS)],
        [-1 / (s23 + EPS), 0 / (s23 + EPS)],
        [(4 / 3) / (s149 + EPS), (-4 / 3) / (s329 + EPS)],
    ])
    torch.testing.assert_close(stepwise_advantages(GAINS, PIDS, "group", 10.0), want, rtol=1e-5, atol=1e-6)
    # Clipping: 8/3 / sqrt(32/9) = 1.414 and -5/3 / sqrt(14/9) = -1.336 are cut to +-1.3.
    clipped = stepwise_advantages(GAINS, PIDS, "group", 1.3)
    torch.testing.assert_close(clipped, want.clamp(-1.3, 1.3), rtol=1e-5, atol=1e-6)
    assert clipped[3, 1] == pytest.approx(1.3) and clipped[3, 0] == pytest.approx(-1.3)


def test_steps_that_were_not_trained_get_zero_advantage_and_global_scope_uses_the_batch_std():
    gains = GAINS.clone()
    gains[:, 0] = nan
    adv = stepwise_advantages(gains, PIDS, "global", 10.0)
    assert (adv[:, 0] == 0).all()
    # step 1: centred on the group means as before, divided by the population std of the whole batch's gains
    # [2, 0, 0, 4, 1, 0]: mean 7/6, squared deviations (5/6)^2 + 3 (7/6)^2 + (17/6)^2 + (1/6)^2 = 462/36, var 462/216
    std = math.sqrt(462 / 216)
    want = torch.tensor([1.0, -4 / 3, -1.0, 8 / 3, 0.0, -4 / 3]) / (std + EPS)
    torch.testing.assert_close(adv[:, 1], want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- TP-GRPO: turning points
# S = 4, all stochastic; rows are V_0 .. V_4 (V_4 the sample's reward).
TP_VALUES = torch.tensor([
    # d = [1, -.5, 1, .5], trend + ; step 0: what follows (V4 - V1 = 1) continues it -> turning point;
    # step 2 flips the falling step 1 back to the trend, and V4 - V3 = .5 continues it -> turning point.
    # L = V4 - V_k = [2, 1, 1.5, .5]
    [0.0, 1.0, 0.5, 1.5, 2.0],
    # d = [-1, 1.5, -.5, -1], trend - ; step 0: V4 - V1 = 0 -> no; step 2 flips step 1 back, V4 - V3 = -1 continues
    # it -> turning point (L = V4 - V2 = -1.5); step 3: no flip.
    [0.0, -1.0, 0.5, 0.0, -1.0],
    # monotone: only step 0 (V4 - V1 = 3 continues it), L = 4.
    [0.0, 1.0, 2.0, 3.0, 4.0],
    # d = [-4, 5, .6, .4], trend + (D = 2); step 1 flips step 0 back and V4 - V2 = 1 continues it: L = V4 - V1 = 6.
    [0.0, -4.0, 1.0, 1.6, 2.0],
])


def test_turning_points_receive_the_aggregated_long_term_reward():
    rewards, turning = turning_point_rewards(TP_VALUES, torch.ones(4, dtype=torch.bool), balance=False)
    assert turning.tolist() == [[True, False, True, False], [False, False, True, False], [True, False, False, False],
                                [False, True, False, False]]
    torch.testing.assert_close(rewards, torch.tensor([
        [2.0, -0.5, 1.5, 0.5],
        [-1.0, 1.5, -1.5, -1.0],
        [4.0, 1.0, 1.0, 1.0],
        [-4.0, 6.0, 0.6, 0.4],
    ]))


def test_balancing_keeps_as_many_rising_as_falling_turning_points_largest_first():
    # Rising turning points: rows 0 (twice, D = 2), 2 (D = 4) and 3 (D = 2, though its L = 6 is the largest);
    # falling: row 1 (D = -1). One of each sign stays: row 1's and row 2's (largest |D|); rows 0 and 3 fall back to
    # their increments.
    rewards, turning = turning_point_rewards(TP_VALUES, torch.ones(4, dtype=torch.bool), balance=True)
    assert turning.tolist() == [[False] * 4, [False, False, True, False], [True, False, False, False], [False] * 4]
    torch.testing.assert_close(rewards, torch.tensor([
        [1.0, -0.5, 1.0, 0.5],
        [-1.0, 1.5, -1.5, -1.0],
        [4.0, 1.0, 1.0, 1.0],
        [-4.0, 5.0, 0.6, 0.4],
    ]))
    # One-sided batch (only rising turning points): nothing to balance against, all kept.
    _, one_sided = turning_point_rewards(TP_VALUES[[0, 2]], torch.ones(4, dtype=torch.bool), balance=True)
    assert one_sided.tolist() == [[True, False, True, False], [True, False, False, False]]


def test_turning_points_over_a_window_of_stochastic_steps():
    # Steps 1 and 2 stochastic in row 0: d = [V2 - V1, V3 - V2] = [-.5, 1], trend V4 - V1 = 1. Step 1: what follows
    # (V4 - V2 = 1.5) opposes it -> no; step 2 flips it back and V4 - V3 = .5 continues it -> L = V4 - V2 = 1.5.
    rewards, turning = turning_point_rewards(TP_VALUES[:1], torch.tensor([False, True, True, False]), balance=False)
    assert turning.tolist() == [[False, False, True, False]]
    assert torch.isnan(rewards[0, [0, 3]]).all()
    torch.testing.assert_close(rewards[0, 1:3], torch.tensor([-0.5, 1.5]))


# ---------------------------------------------------------------------------------- dual-reward mix
def test_dual_advantage_mixes_outcome_and_process_with_the_weight():
    outcome = torch.tensor([1.0, -2.0])
    process = torch.tensor([[0.5, -1.0, 0.0], [2.0, 0.0, 6.0]])
    # w = 0.25: 0.75 * outcome + 0.25 * process; row 1 step 2: -1.5 + 1.5 = 0; row 1 step 0: -1.5 + 0.5 = -1.
    want = torch.tensor([[0.875, 0.5, 0.75], [-1.0, -1.5, 0.0]])
    torch.testing.assert_close(mixed_advantages(outcome, process, 0.25, 5.0), want)
    # weight 1: the process advantage alone, clipped.
    torch.testing.assert_close(mixed_advantages(outcome, process, 1.0, 3.0), process.clamp(-3, 3))


def _trajectory(latents: torch.Tensor, pred_x0: torch.Tensor, sigmas: torch.Tensor, stochastic: list[bool], pids) -> Trajectory:
    B, S = latents.shape[0], latents.shape[1] - 1
    return Trajectory(
        latents=latents, log_probs=torch.zeros(B, S), pred_x0=pred_x0, sigmas=sigmas.expand(B, -1).clone(),
        stochastic=torch.tensor(stochastic).expand(B, -1).clone(), noise_levels=torch.zeros(B, S),
        prompt_ids=torch.tensor(pids), sample_ids=torch.arange(B),
    )


def test_process_values_score_each_clean_prediction_and_the_sample():
    # One element per latent: LatentTarget(1) gives -(x0 - 1)^2.
    latents = torch.tensor([[5.0, 5.0, 0.0], [5.0, 5.0, 3.0]]).reshape(2, 3, 1)
    pred_x0 = torch.tensor([[0.0, 2.0], [1.0, -1.0]]).reshape(2, 2, 1)
    traj = _trajectory(latents, pred_x0, torch.tensor([[1.0, 0.5, 0.0]]), [True, True], [0, 0])
    batch = Batch([traj], None, None, traj.prompt_ids, traj.sample_ids, ["a", "a"], [{}, {}])
    got = process_values(batch, LatentTarget(1.0))
    torch.testing.assert_close(got, torch.tensor([[-1.0, -1.0, -1.0], [0.0, -4.0, -4.0]]))


# ------------------------------------------------------------------------- clean images of latents
class _MeanPixel:
    """A stand-in ensemble: total = mean of each image (records its calls)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images, prompts, meta):
        self.calls += 1
        return SimpleNamespace(total=images.flatten(1).mean(1))


def _ctx(rewards, velocity: float):
    policy = SimpleNamespace(decode=lambda x: x.clone())  # images = latents
    return SimpleNamespace(
        policy=policy, rewards=rewards, sampler=SimpleNamespace(kernel=FlowSDESampler.kernel),
        predict=lambda x, sigma, cond: torch.full_like(x, velocity), encode=lambda traj: None,
    )


def _two_chunks():
    # S = 3, steps 0 and 2 stochastic: scored positions {0, 1, 2} (and 3, the sample's own reward).
    sig = torch.tensor([[1.0, 0.6, 0.3, 0.0]])
    chunks = []
    for base in (0.0, 10.0):
        latents = (base + torch.arange(8.0)).reshape(2, 4, 1)  # x_k = base + 4 b + k (one element)
        pred_x0 = -(base + torch.arange(6.0)).reshape(2, 3, 1)
        chunks.append(_trajectory(latents, pred_x0, sig, [True, False, True], [0, 1]))
    total = torch.tensor([100.0, 200.0, 300.0, 400.0])
    pids = torch.tensor([0, 1, 0, 1])
    return Batch(chunks, None, SimpleNamespace(total=total), pids, torch.arange(4), ["a", "b", "a", "b"], [{}] * 4)


def test_one_step_values_score_the_rollouts_clean_predictions():
    rewards = _MeanPixel()
    got = clean_values(_two_chunks(), _ctx(rewards, 0.0), "one_step")
    want = torch.tensor([[-0.0, -1.0, -2.0, 100.0], [-3.0, -4.0, -5.0, 200.0],
                         [-10.0, -11.0, -12.0, 300.0], [-13.0, -14.0, -15.0, 400.0]])
    torch.testing.assert_close(got, want)
    assert rewards.calls == 3  # one per scored position over the whole local batch; the sample's own is reused


def test_ode_values_complete_each_latent_with_euler_steps():
    # Constant velocity v = 2: Euler from sigma_k to 0 moves x by v * (0 - sigma_k): x_k - 2 sigma_k.
    got = clean_values(_two_chunks(), _ctx(_MeanPixel(), 2.0), "ode")
    x = torch.tensor([[0.0, 1, 2], [4, 5, 6], [10, 11, 12], [14, 15, 16]])
    want = x - 2 * torch.tensor([1.0, 0.6, 0.3])
    torch.testing.assert_close(got[:, :3], want)
    torch.testing.assert_close(got[:, 3], torch.tensor([100.0, 200.0, 300.0, 400.0]))


@pytest.fixture(scope="module")
def toy_policy(tiny_toy_dir):
    policy = SD3Policy(str(tiny_toy_dir), finetune="lora", lora_rank=4, lora_alpha=4.0, dtype="float32",
                       max_sequence_length=0, height=16, width=16)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-zero LoRA B, so the adapters are really in the computation
        for name, p in policy.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return policy


def test_ode_completion_of_a_real_policy_is_the_deterministic_chain(toy_policy):
    """Ground truth: the ODE sample from the same noise. Before the stochastic window (steps 2, 3) the rollout is
    that chain, so completing x_0 or x_2 reproduces the ODE sample; after it, completing x_4 reproduces the rollout's
    own sample; from inside the window it is a different image (the noise moved it)."""
    prompts = ["a red circle", "two blue squares"]
    pids, sids = torch.tensor([0, 1]), torch.tensor([0, 0])

    def roll(sampler):
        return rollout_chunks(toy_policy, sampler, prompts, pids, sids, (5, 0), 6, 1.0, 2, 16, 16)[0][0]

    sde = roll(FlowSDESampler(noise_level=0.7, window_start=2, window_size=2, num_steps=6))
    ode = roll(FlowSDESampler(noise_level=0.0, num_steps=6))
    predict = lambda x, sigma, c: toy_policy.predict(x, sigma, c, 1.0)  # noqa: E731
    cond = toy_policy.encode(prompts)
    kernel = FlowSDESampler.kernel
    for k in (0, 2):
        torch.testing.assert_close(ode_complete(predict, kernel, sde.latents[:, k], sde.sigmas, k, cond), ode.final,
                                   rtol=0, atol=1e-5)
    torch.testing.assert_close(ode_complete(predict, kernel, sde.latents[:, 4], sde.sigmas, 4, cond), sde.final,
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(ode_complete(predict, kernel, sde.final, sde.sigmas, 6, cond), sde.final)
    inside = ode_complete(predict, kernel, sde.latents[:, 3], sde.sigmas, 3, cond)
    assert (inside - ode.final).abs().max() > 1e-2 and (inside - sde.final).abs().max() > 1e-2
    # The one-step estimate at the same latent is not the completion (ode is what the knob buys).
    assert (sde.pred_x0[:, 3] - inside).abs().max() > 1e-3


# ------------------------------------------------------------------------------------ config rules
GUIDE = "{_target_: samplers.guidance.LatentTarget, target: -1.0}"


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return OmegaConf.to_object(compose("train", overrides=["experiment=toy_shapes", *overrides]))


@pytest.mark.parametrize("name,cls", [("dense_grpo", "DenseGRPO"), ("tp_grpo", "TPGRPO"), ("dual_grpo", "DualGRPO")])
def test_each_algorithm_is_one_override_with_its_own_schema(name, cls):
    extra = [f"sampler.reward_guidance={GUIDE}"] if name == "dual_grpo" else []
    cfg = _cfg(f"algorithm={name}", *extra)
    assert cfg.algorithm._target_ == f"trainer.algorithms.dense.{cls}"
    assert type(cfg.algorithm).__name__ == f"{cls}Config"
    validate(cfg, 1)


def test_bad_completion_and_knobs_of_another_algorithm_are_errors():
    with pytest.raises(ConfigError, match=r"algorithm.completion \('exact'\) must be one of"):
        validate(_cfg("algorithm=dense_grpo", "algorithm.completion=exact"), 1)
    with pytest.raises(ConfigError, match=r"algorithm.completion"):
        validate(_cfg("algorithm=tp_grpo", "algorithm.completion=two_step"), 1)
    with pytest.raises(ConfigError, match=r"aggregate \(rewards.aggregate.Pareto\) is not read by algorithm=TPGRPO"):
        validate(_cfg("algorithm=tp_grpo", "aggregate=pareto"), 1)
    with pytest.raises(HydraException):  # dual_grpo's knob is not in dense_grpo's schema: a compose-time error
        _cfg("algorithm=dense_grpo", "algorithm.process_weight=0.5")
    with pytest.raises(HydraException):
        _cfg("algorithm=grpo", "algorithm.completion=ode")


def test_dual_grpo_needs_a_process_reward_and_a_weight_in_range():
    with pytest.raises(ConfigError) as info:
        validate(_cfg("algorithm=dual_grpo", "algorithm.process_weight=0"), 1)
    msg = str(info.value)
    assert "algorithm.process_weight (0.0) must be in (0, 1]" in msg
    assert "algorithm.process_reward is null" in msg and "sampler.reward_guidance" in msg
    # Its own process reward, without the guided sampler:
    validate(_cfg("algorithm=dual_grpo", f"algorithm.process_reward={GUIDE}"), 1)
    # The sampler's guidance reward, with guidance on:
    validate(_cfg("algorithm=dual_grpo", f"sampler.reward_guidance={GUIDE}", "sampler.reward_guidance_scale=1.0"), 1)


def test_dual_grpo_builds_its_own_process_reward():
    cfg = _cfg("algorithm=dual_grpo", f"algorithm.process_reward={GUIDE}")
    algo = DualGRPO(cfg.algorithm)
    assert isinstance(algo._process, LatentTarget) and algo._process.target == -1.0
    assert DualGRPO(_cfg("algorithm=dual_grpo", f"sampler.reward_guidance={GUIDE}").algorithm)._process is None
