"""The clipped-ratio GRPO loss and its KL term against values worked out by hand."""

import math

import pytest
import torch

from trainer.algorithms.grpo import grpo_loss

CLIP = 0.2
# B = 3 samples:
#   0: A = +1,   ratio 1.5 -> unclipped -1.5,  clipped -1 * 1.2 = -1.2; max = -1.2 (clip binds, A > 0)
#   1: A = -2,   ratio 0.5 -> unclipped  1.0,  clipped  2 * 0.8 =  1.6; max =  1.6 (clip binds, A < 0)
#   2: A = +0.5, ratio 1.1 -> inside [0.8, 1.2]: both -0.55
# pg_loss = (-1.2 + 1.6 - 0.55) / 3 = -0.05; clip_frac = 2/3; max |log ratio| = log 2.
RATIOS = [1.5, 0.5, 1.1]
ADV = torch.tensor([1.0, -2.0, 0.5])
OLD = torch.tensor([-1.0, 0.3, 2.0])
PG = (-1.2 + 1.6 - 0.55) / 3
# KL per element (mu - mu_ref)^2 / (2 std^2), averaged over the 4 elements of each sample, then the batch:
#   0: diffs 1, 1, 1, 1, std 1 -> 1 / 2 = 0.5
#   1: diffs 2, 0, 0, 0, std 2 -> (4 / 4) / 8 = 0.125
#   2: no difference           -> 0
KL = (0.5 + 0.125 + 0.0) / 3
BETA = 0.1
REF = torch.zeros(3, 1, 2, 2)
MEAN = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]).reshape(3, 1, 2, 2)
STD = torch.tensor([1.0, 2.0, 0.5])


def _log_prob():
    return (OLD + torch.log(torch.tensor(RATIOS))).requires_grad_()


def test_loss_and_stats_match_hand_computed_values():
    lp = _log_prob()
    loss, stats = grpo_loss(lp, OLD, ADV, CLIP, MEAN, REF, STD, kl_beta=BETA)
    assert loss.shape == ()
    assert stats["pg_loss"].item() == pytest.approx(PG, rel=1e-5)
    assert stats["kl"].item() == pytest.approx(KL, rel=1e-6)
    assert loss.item() == pytest.approx(PG + BETA * KL, rel=1e-5)
    assert stats["clip_frac"].item() == pytest.approx(2 / 3)
    assert stats["log_ratio_abs_max"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert all(not v.requires_grad for v in stats.values())


def test_gradient_flows_only_where_clipping_does_not_bind():
    lp = _log_prob()
    loss, _ = grpo_loss(lp, OLD, ADV, CLIP)
    loss.backward()
    # d/dlp of mean(-A * exp(lp - old)) = -A * ratio / B on the unclipped branch; 0 where the clipped
    # (constant in lp) branch is the max.
    torch.testing.assert_close(lp.grad, torch.tensor([0.0, 0.0, -0.5 * 1.1 / 3]), rtol=1e-5, atol=0)


def test_out_of_range_ratio_keeps_its_gradient_when_the_unclipped_branch_is_the_max():
    # A > 0 with ratio below 1 - eps, A < 0 with ratio above 1 + eps: the pessimistic bound is the
    # unclipped term, so these still train (and still count in clip_frac, as Flow-GRPO counts it).
    adv = torch.tensor([1.0, -2.0])
    old = torch.zeros(2)
    lp = torch.log(torch.tensor([0.5, 1.5])).requires_grad_()
    loss, stats = grpo_loss(lp, old, adv, CLIP)
    assert loss.item() == pytest.approx((-0.5 + 3.0) / 2, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([-1.0 * 0.5 / 2, 2.0 * 1.5 / 2]), rtol=1e-6, atol=0)
    assert stats["clip_frac"].item() == 1.0


def test_on_policy_ratio_is_one_and_the_gradient_is_minus_the_mean_advantage():
    lp = OLD.clone().requires_grad_()
    loss, stats = grpo_loss(lp, OLD, ADV, CLIP)
    assert loss.item() == pytest.approx(-ADV.mean().item(), rel=1e-6)
    assert stats["clip_frac"].item() == 0.0 and stats["log_ratio_abs_max"].item() == 0.0
    loss.backward()
    torch.testing.assert_close(lp.grad, -ADV / 3, rtol=1e-6, atol=0)


def test_kl_gradient_reaches_the_policy_mean():
    mean = MEAN.clone().requires_grad_()
    loss, _ = grpo_loss(OLD.clone(), OLD, torch.zeros(3), CLIP, mean, REF, STD, kl_beta=BETA)
    loss.backward()
    # d/dmu of beta * mean_b mean_l (mu - ref)^2 / (2 std_b^2) = beta * (mu - ref) / (std_b^2 * L * B), L = 4, B = 3.
    expected = BETA * (MEAN - REF) / (STD.reshape(3, 1, 1, 1) ** 2 * 4 * 3)
    torch.testing.assert_close(mean.grad, expected, rtol=1e-6, atol=0)


def test_zero_beta_needs_no_reference_and_reports_zero_kl():
    lp = _log_prob()
    loss, stats = grpo_loss(lp, OLD, ADV, CLIP)  # mean / ref_mean / std None: no reference forward
    assert stats["kl"].item() == 0.0
    assert loss.item() == pytest.approx(PG, rel=1e-5)
    loss_b, stats_b = grpo_loss(lp, OLD, ADV, CLIP, MEAN, REF, STD, kl_beta=0.0)
    assert loss_b.item() == loss.item() and stats_b["kl"].item() == 0.0
