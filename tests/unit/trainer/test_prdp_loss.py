"""PRDP's clipped reward-difference-prediction loss and its gradient against values worked out by hand."""

from types import SimpleNamespace

import pytest
import torch

from trainer.algorithms.prdp import PRDP, PRDPConfig, prdp_loss

BETA, EPS = 0.5, 0.1
# 4 samples, 2 trained steps; samples 0-2 are one prompt, sample 3 is alone (no pair).
#   log-ratio            rollout's            clipped to old +- 0.1      r_hat   r_clip
#   0: [0.3, 0.1]        [0.1, 0.1]           [0.2, 0.1]                 0.2     0.15
#   1: [0.0, 0.2]        [0.0, 0.2]           [0.0, 0.2]                 0.1     0.1
#   2: [0.1, -0.05]      [0.1, 0.0]           [0.1, -0.05]               0.025   0.025
# rewards [1, 0.5, 0.5, 2]: pairs with r_i > r_j in a group: (0, 1), (0, 2) (1 and 2 tie), target 0.5 / 0.5 = 1.
#   (0, 1): unclipped (0.1 - 1)^2 = 0.81,       clipped (0.05 - 1)^2 = 0.9025   -> 0.9025
#   (0, 2): unclipped (0.175 - 1)^2 = 0.680625, clipped (0.125 - 1)^2 = 0.765625 -> 0.765625
LR = torch.tensor([[0.3, 0.1], [0.0, 0.2], [0.1, -0.05], [5.0, 5.0]])
OLD = torch.tensor([[0.1, 0.1], [0.0, 0.2], [0.1, 0.0], [5.0, 5.0]])
REWARDS = torch.tensor([1.0, 0.5, 0.5, 2.0])
PIDS = torch.tensor([3, 3, 3, 8])


def test_loss_and_stats_match_hand_computed_values():
    loss, stats = prdp_loss(LR, OLD, REWARDS, PIDS, EPS, BETA)
    assert loss.item() == pytest.approx((0.9025 + 0.765625) / 2, rel=1e-6)
    assert stats["rdp_mse"].item() == pytest.approx((0.81 + 0.680625) / 2, rel=1e-6)
    assert stats["pairs"].item() == 2
    assert stats["clip_frac"].item() == pytest.approx(1 / 8)  # only sample 0's first step left the range


def test_gradient_flows_through_the_clipped_branch_only_inside_the_range():
    lr = LR.clone().requires_grad_()
    loss, _ = prdp_loss(lr, OLD, REWARDS, PIDS, EPS, BETA)
    loss.backward()
    # Both pairs take the clipped branch. dL/dr_clip_0 = (2 (0.05 - 1) + 2 (0.125 - 1)) / 2 = -1.825, spread over
    # T = 2 steps except the clipped one; dL/dr_clip_1 = 0.95, dL/dr_clip_2 = 0.875; sample 3 has no pair.
    want = torch.tensor([[0.0, -1.825 / 2], [0.475, 0.475], [0.4375, 0.4375], [0.0, 0.0]])
    torch.testing.assert_close(lr.grad, want, rtol=1e-5, atol=1e-7)


def test_on_policy_the_loss_is_the_plain_regression_and_zero_at_the_optimum():
    # log-ratios whose differences equal (r_i - r_j) / beta: the KL-regularised optimum (paper eq. 13).
    rewards = torch.tensor([0.3, 0.1, -0.2])
    lr = (rewards / BETA)[:, None].expand(3, 4).clone().requires_grad_()
    loss, stats = prdp_loss(lr, lr.detach(), rewards, torch.zeros(3, dtype=torch.long), EPS, BETA)
    assert loss.item() == pytest.approx(0.0, abs=1e-10) and stats["pairs"].item() == 3
    loss.backward()
    assert lr.grad.abs().max().item() < 1e-6


def test_all_tied_rewards_give_zero_loss_and_gradient():
    lr = LR[:2].clone().requires_grad_()
    loss, stats = prdp_loss(lr, OLD[:2], torch.tensor([1.0, 1.0]), torch.tensor([0, 0]), EPS, BETA)
    loss.backward()
    assert loss.item() == 0.0 and stats["pairs"].item() == 0 and lr.grad.abs().max().item() == 0.0


def _train(aggregate="rewards.aggregate.WeightedSum"):
    return SimpleNamespace(aggregate={"_target_": aggregate})


def test_config_rules():
    assert PRDP.problems(PRDPConfig(), _train(), 2) == []
    p = PRDP.problems(PRDPConfig(kl_beta=0.0, clip_range=-1.0, optimizer_steps_per_epoch=2, timestep_fraction=0.0),
                      _train("rewards.aggregate.AdvantageSum"), 1)
    for key in ("algorithm.kl_beta", "algorithm.clip_range", "algorithm.optimizer_steps_per_epoch",
                "algorithm.timestep_fraction", "aggregate=weighted_sum"):
        assert any(key in m for m in p), key
    assert PRDP(PRDPConfig()).needs_reference()
