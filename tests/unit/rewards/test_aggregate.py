"""Reward aggregators against hand-computed values; regularisers; the config group composes."""
from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from rewards.aggregate import AdvantageSum, Pareto, UncertaintyWeighted, WeightedSum, pareto_front
from trainer.advantages import distributed_advantages, group_advantages

EPS = 1e-4
PIDS = torch.tensor([0, 0, 0, 1, 1, 1])
# Reward a: groups (1, 2, 3) and (0, 0, 3); reward b in another unit: (10, 30, 20) and (5, 5, 5).
A = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 3.0])
B = torch.tensor([10.0, 30.0, 20.0, 5.0, 5.0, 5.0])


def test_weighted_sum_is_the_group_advantage_of_the_weighted_total():
    adv, stats = WeightedSum()({"a": A, "b": B}, {"a": 1.0, "b": 0.1}, PIDS)
    # total: (2, 5, 5) -> mean 4, centred (-2, 1, 1), std sqrt(2); (0.5, 0.5, 3.5) -> mean 1.5, centred (-1, -1, 2), std sqrt(2)
    s = math.sqrt(2) + EPS
    torch.testing.assert_close(adv, torch.tensor([-2 / s, 1 / s, 1 / s, -1 / s, -1 / s, 2 / s]), rtol=1e-6, atol=1e-6)
    assert stats == {}


def test_advantage_sum_normalises_each_reward_in_its_group_first():
    adv, _ = AdvantageSum()({"a": A, "b": B}, {"a": 1.0, "b": 0.1}, PIDS)
    # a alone: group 0 (-1, 0, 1)/sqrt(2/3); b alone: group 0 (-10, 10, 0)/sqrt(200/3), group 1 all equal -> 0.
    sa, sb = math.sqrt(2 / 3) + EPS, math.sqrt(200 / 3) + EPS
    s1 = math.sqrt(2) + EPS
    want = torch.tensor([-1 / sa - 0.1 * 10 / sb, 0.1 * 10 / sb, 1 / sa, -1 / s1, -1 / s1, 2 / s1])
    torch.testing.assert_close(adv, want, rtol=1e-5, atol=1e-6)
    # The scale of b no longer matters: multiplying it by 1000 changes nothing.
    torch.testing.assert_close(AdvantageSum()({"a": A, "b": B * 1000}, {"a": 1.0, "b": 0.1}, PIDS)[0], want,
                               rtol=1e-4, atol=1e-5)


def test_pareto_front_within_groups():
    # Group 0: (1,10) (2,30) (3,20): (1,10) is dominated by both others; (2,30) and (3,20) trade off.
    # Group 1: (0,5) (0,5) (3,5): (3,5) dominates the two ties, which do not dominate each other.
    front = pareto_front(torch.stack([A, B], 1), PIDS)
    assert front.tolist() == [False, True, True, False, False, True]
    adv, stats = Pareto()({"a": A, "b": B}, {"a": 1.0, "b": 0.1}, PIDS)
    base, _ = WeightedSum()({"a": A, "b": B}, {"a": 1.0, "b": 0.1}, PIDS)
    torch.testing.assert_close(adv, base * front)
    assert stats["pareto_front_frac"] == pytest.approx(0.5)


def test_pareto_respects_negative_weights():
    # With b's weight negative, lower b is better: (1,10) now trades off against (3,20) and (2,30) is dominated by (3,20).
    front = pareto_front(torch.stack([A, -B], 1), PIDS)
    assert front[:3].tolist() == [True, False, True]
    adv, _ = Pareto()({"a": A, "b": B}, {"a": 1.0, "b": -0.1}, PIDS)
    assert adv[1] == 0


def test_uncertainty_weighting_reduces_to_weighted_sum_at_temperature_zero_and_downweights_scatter():
    rewards, weights = {"a": A, "b": B}, {"a": 1.0, "b": 0.1}
    torch.testing.assert_close(UncertaintyWeighted(0.0)(rewards, weights, PIDS)[0], WeightedSum()(rewards, weights, PIDS)[0])
    adv, stats = UncertaintyWeighted(1.0)(rewards, weights, PIDS)
    # Hand computation for group 0: u_b = std(10,30,20) / std(B) ; c_b = exp(-u_b)
    u_b0 = math.sqrt(200 / 3) / B.std(unbiased=False).item()
    u_a0 = math.sqrt(2 / 3) / A.std(unbiased=False).item()
    total0 = torch.exp(torch.tensor(-u_a0)) * A[:3] + 0.1 * torch.exp(torch.tensor(-u_b0)) * B[:3]
    torch.testing.assert_close(adv[:3], group_advantages(total0, torch.zeros(3, dtype=torch.long)), rtol=1e-5, atol=1e-6)
    assert stats["uncertainty/b"] == pytest.approx((u_b0 + 0.0) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        UncertaintyWeighted(-1.0)


def test_regulariser_is_added_centred_and_unnormalised_and_monitors_stay_out():
    per_reward = {"a": A, "reg": torch.tensor([0.0, 1.0, 2.0, 0.0, 0.0, 0.0]), "mon": torch.full((6,), float("nan"))}
    weights = {"a": 1.0, "reg": -0.5, "mon": 0.0}
    adv, _ = distributed_advantages(per_reward, weights, {"reg"}, PIDS, rank=0, aggregator=WeightedSum())
    base = group_advantages(A, PIDS)
    torch.testing.assert_close(adv, base + -0.5 * torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize("name", ["weighted_sum", "advantage_sum", "pareto", "uncertainty"])
def test_every_aggregate_config_composes_and_runs(name):
    from hydra import compose, initialize_config_dir

    from trainer.config import ROOT, register

    register()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"aggregate={name}"])
    adv, _ = instantiate(cfg.aggregate)({"a": A, "b": B}, {"a": 1.0, "b": 0.1}, PIDS)
    assert adv.shape == (6,) and torch.isfinite(adv).all()
