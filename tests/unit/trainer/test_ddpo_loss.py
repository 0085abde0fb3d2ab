"""DDPO: the per-prompt stat tracker against hand-computed statistics, its checkpointed state, the clipped
loss on tracker advantages by hand, and the config rules."""

import math
from types import SimpleNamespace

import pytest
import torch

from trainer.algorithms.ddpo import DDPO, DDPOConfig, PromptStatTracker
from trainer.algorithms.grpo import grpo_loss

EPS = 1e-6


def test_prompt_with_enough_rewards_uses_its_own_buffer():
    t = PromptStatTracker(buffer_size=3, min_count=2)
    adv, batch_share = t.update(torch.tensor([1.0, 2.0, 3.0, 5.0]), [0, 0, 7, 7])
    # prompt 0: mean 1.5, population std 0.5; prompt 7: mean 4, std 1.
    torch.testing.assert_close(adv, torch.tensor([-0.5 / (0.5 + EPS), 0.5 / (0.5 + EPS), -1 / (1 + EPS), 1 / (1 + EPS)]))
    assert batch_share == 0.0


def test_prompt_below_min_count_uses_the_batch_statistics():
    t = PromptStatTracker(buffer_size=4, min_count=3)
    r = torch.tensor([1.0, 2.0, 3.0, 4.0])
    adv, batch_share = t.update(r, [0, 0, 1, 1])
    std = math.sqrt(1.25)  # population std of 1..4, mean 2.5
    torch.testing.assert_close(adv, (r - 2.5) / (std + EPS))
    assert batch_share == 1.0
    # Next iteration prompt 0 has 3 rewards: its own buffer [1, 2, 6] (mean 3, std sqrt(14/3)); prompt 1 gets
    # only one more, so 3 as well: [3, 4, 0] (mean 7/3).
    adv, batch_share = t.update(torch.tensor([6.0, 0.0]), [0, 1])
    torch.testing.assert_close(adv, torch.tensor([3 / (math.sqrt(14 / 3) + EPS),
                                                  (0 - 7 / 3) / (math.sqrt(26 / 9) + EPS)]))
    assert batch_share == 0.0


def test_buffer_keeps_only_the_newest_rewards():
    t = PromptStatTracker(buffer_size=2, min_count=2)
    t.update(torch.tensor([1.0, 2.0]), [3, 3])
    t.update(torch.tensor([10.0]), [3])
    assert list(t.buffers[3]) == [2.0, 10.0]


def test_state_round_trip_continues_exactly():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(6, generator=g), ['a', 'a', 'b', 'b', 'c', 'c']) for _ in range(4)]
    straight = PromptStatTracker(3, 2)
    outs = [straight.update(r, p)[0] for r, p in batches]
    first = PromptStatTracker(3, 2)
    for r, p in batches[:2]:
        first.update(r, p)
    resumed = PromptStatTracker(3, 2)
    resumed.load_state_dict(torch.load(_saved(first.state_dict()), weights_only=False))
    for (r, p), want in zip(batches[2:], outs[2:]):
        assert torch.equal(resumed.update(r, p)[0], want)


def _saved(state):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def _batch(total, pids):
    return SimpleNamespace(scored=SimpleNamespace(total=total), prompt_ids=pids)


def test_ddpo_loss_on_tracker_advantages_by_hand():
    """Rewards [0, 1] of one prompt (buffer full): advantages -1 and +1 (up to the 1e-6); clipped to 0.5.
    With clip 0.2 and ratios 0.5 (A = -0.5: max(0.25, 0.4) = 0.4) and 1.1 (A = 0.5: -0.55 inside): loss
    (0.4 - 0.55) / 2 = -0.075."""
    algo = DDPO(DDPOConfig(buffer_size=2, min_count=2, adv_clip=0.5, clip_range=0.2))
    ctx = SimpleNamespace(world=SimpleNamespace(rank=0), prompts=[f"prompt {i}" for i in range(5)])
    adv, _ = algo.advantages(_batch(torch.tensor([0.0, 1.0]), torch.tensor([4, 4])), ctx)
    torch.testing.assert_close(adv, torch.tensor([-0.5, 0.5]))
    old = torch.tensor([-2.0, 1.0])
    loss, _ = grpo_loss(old + torch.log(torch.tensor([0.5, 1.1])), old, adv, 0.2)
    assert loss.item() == pytest.approx(-0.075, rel=1e-6)
    assert algo.state_dict() == {"buffers": {"prompt 4": [0.0, 1.0]}}


def test_the_tracker_follows_prompts_not_their_position_in_the_file():
    """A resume with a reordered prompts file keeps each prompt's history; buffers keyed by id (older
    checkpoints) are re-keyed by the run's prompt table on first use."""
    algo = DDPO(DDPOConfig(buffer_size=4, min_count=2))
    first = SimpleNamespace(world=SimpleNamespace(rank=0), prompts=["cat", "dog"])
    algo.advantages(_batch(torch.tensor([0.0, 1.0, 5.0, 7.0]), torch.tensor([0, 0, 1, 1])), first)
    resumed = DDPO(DDPOConfig(buffer_size=4, min_count=2))
    resumed.load_state_dict(torch.load(_saved(algo.state_dict()), weights_only=False))
    reordered = SimpleNamespace(world=SimpleNamespace(rank=0), prompts=["dog", "cat"])
    resumed.advantages(_batch(torch.tensor([6.0, 2.0]), torch.tensor([0, 1])), reordered)
    assert {k: list(v) for k, v in resumed.tracker.buffers.items()} == {"cat": [0.0, 1.0, 2.0], "dog": [5.0, 7.0, 6.0]}
    legacy = DDPO(DDPOConfig(buffer_size=4, min_count=2))
    legacy.load_state_dict({"buffers": {0: [0.0, 1.0], 1: [5.0, 7.0]}})
    legacy.advantages(_batch(torch.tensor([2.0]), torch.tensor([0])), first)
    assert {k: list(v) for k, v in legacy.tracker.buffers.items()} == {"cat": [0.0, 1.0, 2.0], "dog": [5.0, 7.0]}


def test_load_rejects_a_foreign_state():
    with pytest.raises(ValueError, match="unknown keys"):
        DDPO(DDPOConfig()).load_state_dict({"ema": 1})


def _train(aggregate="rewards.aggregate.WeightedSum", rewards=None):
    return SimpleNamespace(aggregate={"_target_": aggregate}, rewards=rewards or {"a": {"_target_": "x", "weight": 1.0}})


def test_config_rules():
    assert DDPO.problems(DDPOConfig(), _train(), 1) == []
    p = DDPO.problems(DDPOConfig(buffer_size=4, min_count=8, clip_range=0.0), _train("rewards.aggregate.Pareto"), 1)
    assert any("algorithm.min_count (8)" in m for m in p)
    assert any("algorithm.clip_range" in m for m in p)
    assert any("aggregate=weighted_sum" in m for m in p)
    p = DDPO.problems(DDPOConfig(), _train(rewards={"a": {"_target_": "x", "role": "regularizer"}}), 1)
    assert any("role=regularizer" in m for m in p)
