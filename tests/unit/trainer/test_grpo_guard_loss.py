"""GRPO-Guard's RatioNorm loss against hand-computed values, its normalised log-ratio against the Gaussian
identity it rests on, and the rollout mean rebuilt from a stored trajectory against the real one."""

import math

import pytest
import torch

from samplers.base import gaussian_log_prob
from samplers.ddim import DDIMSampler
from samplers.flow_sde import FlowSDESampler
from trainer.algorithms.grpo_guard import GRPOGuard, guard_loss, rollout_mean

CLIP = 0.2
# B = 2 samples of 2 elements each (mean reduction):
#   0: mu - mu_old = [1, -1] -> mean sq 1, s = 0.5 -> b = 1 / (2 * 0.25) = 2; raw log-ratio -1.5
#      -> (-1.5 + 2) * 0.5 = 0.25, ratio e^0.25 = 1.2840 > 1.2; A = +1: max(-1.2840, -1.2) = -1.2 (clip
#      binds); / dt 0.25 -> -4.8
#   1: mu = mu_old -> b = 0; raw 0.05, s = 2 -> 0.1, ratio e^0.1 = 1.10517 inside; A = -1: 1.10517;
#      / dt 0.5 -> 2.21034
# pg = (-4.8 + 2.21034) / 2; clip_frac 1/2; mean b = 1; max |raw log-ratio| = 1.5.
OLD = torch.tensor([0.3, -0.7])
RAW = torch.tensor([-1.5, 0.05])
ADV = torch.tensor([1.0, -1.0])
STD = torch.tensor([0.5, 2.0])
DT = torch.tensor([0.25, 0.5])
OLD_MEAN = torch.tensor([[0.2, 0.4], [1.0, -1.0]])
MEAN = OLD_MEAN + torch.tensor([[1.0, -1.0], [0.0, 0.0]])
PG = (-1.2 / 0.25 + math.exp(0.1) / 0.5) / 2


def _loss(log_prob, mean=MEAN, dt=DT, reduction="mean"):
    return guard_loss(log_prob, OLD, ADV, CLIP, mean, OLD_MEAN, STD, dt, reduction)


def test_loss_and_stats_match_hand_computed_values():
    loss, stats = _loss(OLD + RAW)
    assert loss.item() == pytest.approx(PG, rel=1e-6)
    assert stats["pg_loss"].item() == pytest.approx(PG, rel=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(0.5)
    assert stats["ratio_bias"].item() == pytest.approx(1.0)
    assert stats["log_ratio_abs_max"].item() == pytest.approx(1.5)
    assert stats["kl"].item() == 0.0


def test_without_reweighting_the_step_losses_are_not_divided_by_dt():
    loss, _ = _loss(OLD + RAW, dt=None)
    assert loss.item() == pytest.approx((-1.2 + math.exp(0.1)) / 2, rel=1e-6)


def test_sum_reduction_sums_the_bias_like_the_log_prob():
    # sample 0: sum sq 2 -> b = 4 -> (-1.5 + 4) * 0.5 = 1.25 (clip binds: -1.2 / 0.25); sample 1 unchanged.
    _, stats = _loss(OLD + RAW, reduction="sum")
    assert stats["ratio_bias"].item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="log_prob_reduction"):
        _loss(OLD + RAW, reduction="max")


def test_gradient_is_the_normalised_ratio_times_s_over_dt_where_unclipped():
    lp = (OLD + RAW).clone().requires_grad_()
    loss, _ = _loss(lp)
    loss.backward()
    # d/dlp_1 of (1/B) * (-A_1) * exp((lp_1 - old_1) * s_1) / dt_1 = 0.5 * 1 * e^0.1 * 2 / 0.5; sample 0 clipped.
    torch.testing.assert_close(lp.grad, torch.tensor([0.0, 0.5 * math.exp(0.1) * 2 / 0.5]), rtol=1e-6, atol=0)


def test_normalised_log_ratio_is_the_noise_projection_of_the_mean_shift():
    """For x = mu_old + s eps: (log p(x; mu, s) - log p(x; mu_old, s) + b) * s = mean(eps * (mu - mu_old)) exactly,
    whatever s: mean 0 and a scale independent of the step's noise."""
    g = torch.Generator().manual_seed(0)
    mu_old = torch.randn(3, 4, 5, generator=g)
    shift = 0.01 * torch.randn(3, 4, 5, generator=g)
    eps = torch.randn(3, 4, 5, generator=g)
    for s in (0.05, 0.3, 2.0):
        std = torch.full((3,), s)
        x = mu_old + s * eps
        lp = gaussian_log_prob(x, mu_old + shift, std, "mean")
        lp_old = gaussian_log_prob(x, mu_old, std, "mean")
        bias = shift.pow(2).flatten(1).mean(1) / (2 * std**2)
        torch.testing.assert_close((lp - lp_old + bias) * std, (eps * shift).flatten(1).mean(1), rtol=1e-3, atol=1e-7)


def _predict(x, sigma, cond):
    return 0.7 * x - 0.2 * torch.tanh(x) + 0.1  # any smooth model output


@pytest.mark.parametrize("sampler, sigmas", [
    (FlowSDESampler(noise_level=0.7, num_steps=4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])),
    (DDIMSampler(noise_level=1.0, num_steps=4), torch.tensor([0.99, 0.9, 0.7, 0.4, 0.0])),
])
def test_rollout_mean_rebuilt_from_the_trajectory_equals_the_rollouts(sampler, sigmas):
    B = 3
    x_T = torch.randn(B, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    gens = [torch.Generator().manual_seed(10 + i) for i in range(B)]
    traj = sampler.rollout(_predict, x_T, sigmas, None, gens, torch.zeros(B, dtype=torch.long), torch.arange(B))
    for j in traj.stochastic[0].nonzero().flatten().tolist():
        _, mean, _ = sampler.log_prob(_predict, traj, j, None)
        torch.testing.assert_close(rollout_mean(sampler, traj, j), mean, rtol=1e-5, atol=1e-5)


def test_config_rules_are_grpos_plus_the_log_prob_reduction(monkeypatch):
    from trainer.algorithms.grpo_guard import GRPOGuardConfig

    class Train:
        class sampler:
            log_prob_reduction = "median"

    p = GRPOGuard.problems(GRPOGuardConfig(clip_range=0.0, timestep_fraction=1.5), Train, 1)
    assert any("algorithm.clip_range" in m for m in p)
    assert any("algorithm.timestep_fraction" in m for m in p)
    assert any("sampler.log_prob_reduction" in m for m in p)
