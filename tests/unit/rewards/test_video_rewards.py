"""Video rewards against hand-computed values on tiny clips, and their configs composed as users attach them."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from models.toy import video as toy
from rewards.image_stats import ImageStatistic
from rewards.video import (
    AttenuatedVideoReward, MovingShapeReward, SegmentalVideoReward, TemporalConsistencyReward, attenuation_weights,
    segment_frames,
)
from trainer.config import register

CONF = Path(__file__).resolve().parents[3] / "conf"
BRIGHTNESS = {"_target_": "rewards.image_stats.ImageStatistic", "statistic": "brightness"}


def ramp(values, size=4) -> torch.Tensor:
    """[1, F, 3, size, size] grey clip whose frame f is values[f] everywhere (brightness = values[f])."""
    v = torch.tensor(values, dtype=torch.float32)
    return v.reshape(1, -1, 1, 1, 1).expand(1, len(values), 3, size, size).clone()


def test_segment_frames_by_hand():
    assert segment_frames(8, 4, 1).tolist() == [[1], [3], [5], [7]]  # middles of [0,2) [2,4) [4,6) [6,8)
    assert segment_frames(8, 4, 2).tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert segment_frames(9, 2, 2).tolist() == [[1, 3], [5, 7]]  # segments [0,4) and [4,9)
    with pytest.raises(ValueError, match=r"5-frame video .*\(3\).*\(2\)"):
        segment_frames(5, 3, 2)


def test_segmental_reward_by_hand():
    clip = ramp([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    out = SegmentalVideoReward(BRIGHTNESS, num_segments=4, frames_per_segment=1)(clip, ["p"])
    torch.testing.assert_close(out["reward"], torch.tensor([0.4]))  # mean of frames 1, 3, 5, 7
    torch.testing.assert_close(out["segment_0"], torch.tensor([0.1]))
    torch.testing.assert_close(out["segment_3"], torch.tensor([0.7]))
    two = SegmentalVideoReward(BRIGHTNESS, num_segments=4, frames_per_segment=2)(clip, ["p"])
    torch.testing.assert_close(two["segment_1"], torch.tensor([0.25]))  # (0.2 + 0.3) / 2
    torch.testing.assert_close(two["reward"], torch.tensor([0.35]))
    low = SegmentalVideoReward(BRIGHTNESS, num_segments=4, aggregation="min")(clip, ["p"])
    torch.testing.assert_close(low["reward"], torch.tensor([0.1]))


def test_attenuation_weights_and_reward_by_hand():
    torch.testing.assert_close(attenuation_weights(3, 0.5, "first"), torch.tensor([1, 0.5, 0.25]) / 1.75)
    torch.testing.assert_close(attenuation_weights(3, 0.5, "center"), torch.tensor([0.25, 0.5, 0.25]))
    torch.testing.assert_close(attenuation_weights(2, 0.5, "last"), torch.tensor([1 / 3, 2 / 3]))
    clip = ramp([0.0, 0.3, 0.6])
    first = AttenuatedVideoReward(BRIGHTNESS, decay=0.5, anchor="first")(clip, ["p"])
    torch.testing.assert_close(first["reward"], torch.tensor([(0.5 * 0.3 + 0.25 * 0.6) / 1.75]))
    torch.testing.assert_close(first["last_frame"], torch.tensor([0.6]))
    flat = AttenuatedVideoReward(BRIGHTNESS, decay=1.0)(clip, ["p"])
    torch.testing.assert_close(flat["reward"], torch.tensor([0.3]))
    strided = AttenuatedVideoReward(BRIGHTNESS, decay=0.5, anchor="first", frame_stride=2)(clip, ["p"])
    torch.testing.assert_close(strided["reward"], torch.tensor([(0.0 + 0.5 * 0.6) / 1.5]))  # frames 0 and 2


def test_wrapped_rewards_pass_gradients_and_per_frame_metadata():
    seen = {}

    class Recorder:
        differentiable = False

        def __call__(self, images, prompts, metadata=None):
            seen.update(prompts=prompts, metadata=metadata, shape=tuple(images.shape))
            return torch.zeros(len(images))

    clip = torch.rand(2, 8, 3, 4, 4)
    reward = SegmentalVideoReward(Recorder(), num_segments=2)
    assert reward.differentiable is False
    reward(clip, ["a", "b"], [{"prompt_id": 0}, {"prompt_id": 1}])
    assert seen["shape"] == (4, 3, 4, 4) and seen["prompts"] == ["a", "a", "b", "b"]
    assert seen["metadata"][3] == {"prompt_id": 1, "frame": 1}

    clip.requires_grad_(True)
    for r in (SegmentalVideoReward(BRIGHTNESS), AttenuatedVideoReward(BRIGHTNESS), TemporalConsistencyReward()):
        assert r.differentiable is True and r.input_kind == "video"
        clip.grad = None
        r(clip, ["a", "b"])["reward"].sum().backward()
        assert clip.grad is not None and clip.grad.abs().sum() > 0, type(r).__name__


def test_temporal_consistency_by_hand():
    # 1x1-pixel frames: features are the RGB triples themselves.
    clip = torch.tensor([[1.0, 0, 0], [1, 1, 0], [0, 1, 0]]).reshape(1, 3, 3, 1, 1)
    out = TemporalConsistencyReward()(clip)
    torch.testing.assert_close(out["reward"], torch.tensor([1 / math.sqrt(2)]))
    cut = torch.tensor([[1.0, 0, 0], [1, 0, 0], [0, 0, 1]]).reshape(1, 3, 3, 1, 1)
    out = TemporalConsistencyReward()(cut)
    torch.testing.assert_close(out["reward"], torch.tensor([0.5]))
    torch.testing.assert_close(out["min_pair"], torch.tensor([0.0]))
    # A still clip is perfectly consistent; a shape that jumps across the frame is less so than one that steps.
    still = torch.rand(1, 1, 3, 8, 8).expand(1, 4, 3, 8, 8)
    torch.testing.assert_close(TemporalConsistencyReward()(still)["reward"], torch.tensor([1.0]))
    # A given feature extractor replaces the pixels: here a 2-D projection.
    proj = lambda images: torch.stack([images[:, 0].mean((1, 2)), images[:, 2].mean((1, 2))], 1)  # noqa: E731
    torch.testing.assert_close(TemporalConsistencyReward(features=proj)(cut)["reward"], torch.tensor([0.5]))
    assert TemporalConsistencyReward(features=proj).differentiable is False
    with pytest.raises(ValueError, match="at least 2 frames"):
        TemporalConsistencyReward()(clip[:, :1])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"\[B, F, 3, H, W\]"):
        SegmentalVideoReward(BRIGHTNESS)(torch.rand(2, 3, 8, 8), ["a", "b"])
    with pytest.raises(ValueError, match="aggregation.*'max'"):
        SegmentalVideoReward(BRIGHTNESS, aggregation="max")
    with pytest.raises(ValueError, match="no 'weight'"):
        SegmentalVideoReward({**BRIGHTNESS, "weight": 2.0})
    with pytest.raises(ValueError, match="decay"):
        AttenuatedVideoReward(BRIGHTNESS, decay=0.0)
    with pytest.raises(ValueError, match="pool applies to pixel"):
        TemporalConsistencyReward(features=ImageStatistic("brightness"), pool=4)


def test_moving_shape_reward_on_rendered_clips():
    rng = np.random.default_rng(0)
    reward = MovingShapeReward()
    for spec in toy.all_specs():
        clip = torch.from_numpy(toy.render(spec, rng)).permute(0, 3, 1, 2).float()[None] / 255  # [1, F, 3, H, W]
        prompt = toy.caption(spec)
        out = reward(clip, [prompt])
        assert out["reward"].tolist() == [1.0] and out["present"].tolist() == [1.0], prompt
        travel = toy.SPEED * (toy.FRAMES - 1) / toy.SIZE  # in frame widths
        torch.testing.assert_close(out["displacement"], torch.tensor([travel]))
        backwards = reward(clip.flip(1), [prompt])
        assert backwards["reward"].tolist() == [0.0]
        torch.testing.assert_close(backwards["displacement"], torch.tensor([-travel]))
    red_left = toy.MotionSpec("red", "square", "left")
    clip = torch.from_numpy(toy.render(red_left, rng)).permute(0, 3, 1, 2).float()[None] / 255
    wrong_colour = reward(clip, ["a blue square moving left"])
    assert wrong_colour["present"].tolist() == [0.0] and wrong_colour["reward"].tolist() == [0.0]
    assert math.isnan(float(wrong_colour["displacement"]))
    still = clip[:, :1].expand(1, toy.FRAMES, 3, toy.SIZE, toy.SIZE)
    assert reward(still, ["a red square moving left"])["reward"].tolist() == [0.0]
    with pytest.raises(ValueError, match="not a moving-shapes caption"):
        reward(clip, ["a red square"])


@pytest.mark.parametrize("name", ["video_segments", "video_attenuated", "temporal_consistency"])
def test_configs_compose_build_and_score(name):
    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"+reward@rewards.probe={name}"])
    spec = OmegaConf.to_container(cfg.rewards.probe, resolve=True)
    spec.pop("weight")
    reward = instantiate(spec)  # as RewardEnsemble builds it (nested _target_ built by Hydra first)
    assert reward.input_kind == "video" and isinstance(reward.differentiable, bool)
    out = reward(torch.rand(2, 8, 3, 16, 16, generator=torch.Generator().manual_seed(0)), ["a", "b"])
    assert out["reward"].shape == (2,) and torch.isfinite(out["reward"]).all()
