"""Scoring chunk by chunk in the background equals scoring the batch; failures name the reward."""
from __future__ import annotations

import pytest
import torch

from rewards.ensemble import RewardEnsemble, RewardResult

SPECS = {"jpeg": {"_target_": "rewards.jpeg.JpegCompressibility", "weight": 1.0},
         "bright": {"_target_": "rewards.image_stats.ImageStatistic", "statistic": "brightness", "weight": 0.5}}


def test_background_chunks_concatenate_to_the_whole_batch_result():
    ens = RewardEnsemble(SPECS)
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = [f"p{i}" for i in range(6)]
    whole = ens(images, prompts)
    parts = RewardResult.cat([ens.submit(images[s:s + 2], prompts[s:s + 2]).result() for s in (0, 2, 4)])
    assert torch.equal(parts.total, whole.total)
    assert parts.per_reward.keys() == whole.per_reward.keys() and parts.components.keys() == whole.components.keys()
    for k in whole.components:
        assert torch.equal(parts.components[k], whole.components[k]), k
    assert ens.chunkable


def test_a_component_missing_from_one_chunk_is_nan_there():
    a = RewardResult(torch.ones(2), {"r": torch.ones(2)}, {"r/x": torch.tensor([1.0, 2.0])})
    b = RewardResult(torch.zeros(1), {"r": torch.zeros(1)}, {})
    c = RewardResult.cat([a, b])
    assert c.components["r/x"][:2].tolist() == [1.0, 2.0] and torch.isnan(c.components["r/x"][2])


class Broken:
    input_kind, differentiable = "pixels", False

    def __call__(self, images, prompts, metadata=None):
        raise OSError("disk on fire")


def test_a_failing_reward_in_the_background_names_itself():
    ens = RewardEnsemble({"fragile": {"_target_": "test_ensemble_chunks.Broken"}})
    with pytest.raises(RuntimeError, match="reward 'fragile' failed.*disk on fire"):
        ens.submit(torch.rand(2, 3, 8, 8), ["a", "b"]).result(timeout=30)


def test_win_rate_rewards_are_not_chunkable():
    ens = RewardEnsemble({"pref": {"_target_": "rewards.winrate.WinRate",
                                   "judge": {"_target_": "rewards.winrate.ScalarPreference",
                                             "reward": {"_target_": "rewards.jpeg.JpegCompressibility"}}}})
    assert not ens.chunkable
