"""Pref-GRPO's win-rate reward against hand-computed values, and the whole-group rule."""
from __future__ import annotations

import math

import pytest
import torch

from rewards.winrate import ScalarPreference, WinRate


class Fixed:
    """Pointwise reward = the mean pixel value (known exactly for constant images)."""

    input_kind, differentiable = "pixels", False

    def __call__(self, images, prompts, metadata=None):
        return images.float().mean(dim=(1, 2, 3))


def _images(values):
    return torch.stack([torch.full((3, 4, 4), v) for v in values])


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_win_rates_by_hand_per_group():
    judge = {"_target_": "rewards.winrate.ScalarPreference", "temperature": 0.1,
             "reward": {"_target_": "test_winrate.Fixed"}}
    reward = WinRate(judge)
    # group 7: values 0.2, 0.4, 0.3; group 3: 0.5, 0.5
    images = _images([0.2, 0.5, 0.4, 0.5, 0.3])
    meta = [{"prompt_id": p} for p in (7, 3, 7, 3, 7)]
    out = reward(images, ["a"] * 5, meta)
    p = lambda a, b: _sig((a - b) / 0.1)  # noqa: E731
    want = [(p(0.2, 0.4) + p(0.2, 0.3)) / 2, 0.5, (p(0.4, 0.2) + p(0.4, 0.3)) / 2, 0.5, (p(0.3, 0.2) + p(0.3, 0.4)) / 2]
    torch.testing.assert_close(out["reward"], torch.tensor(want), rtol=1e-5, atol=1e-6)
    # A group's win rates average to 1/2 whatever the scores (each pair hands out one win).
    assert out["reward"][[0, 2, 4]].mean().item() == pytest.approx(0.5, abs=1e-6)
    assert out["pref_margin"][1] == 0.0  # identical samples: the judge is undecided
    # Scale-free: multiplying the pointwise gaps' scale by 10 with T x 10 changes nothing.
    pref = ScalarPreference({"_target_": "test_winrate.Fixed"}, temperature=1.0)
    torch.testing.assert_close(pref.preference(_images([0.0, 1.0]), "a"), torch.tensor([[0.5, _sig(-1)], [_sig(1), 0.5]]))


def test_win_rate_needs_group_ids_and_is_undefined_alone():
    reward = WinRate({"_target_": "rewards.winrate.ScalarPreference", "reward": {"_target_": "test_winrate.Fixed"}})
    with pytest.raises(ValueError, match="prompt_id"):
        reward(_images([0.1, 0.2]), ["a", "a"])
    alone = reward(_images([0.1, 0.2]), ["a", "b"], [{"prompt_id": 0}, {"prompt_id": 1}])
    assert torch.isnan(alone["reward"]).all()  # nothing to compare with (evaluation's one sample per prompt)


def test_groups_must_not_span_ranks_when_a_win_rate_is_trained():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from trainer.config import ROOT, ConfigError, register, validate

    register()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=[
            "experiment=toy_shapes", "+reward@rewards.pref=winrate", "data.prompts_per_step=3", "algorithm.group_size=4",
            "train.micro_batch=2"]))
    validate(cfg, 1)
    with pytest.raises(ConfigError, match="whole groups"):
        validate(cfg, 2)  # 12 samples over 2 ranks = 6 each: a group of 4 would be split
