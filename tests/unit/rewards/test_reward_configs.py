"""Every reward config composes into the training job the way users attach it
(``+reward@rewards.<name>=<file>``), builds the way `RewardEnsemble` builds it, and scores a batch."""

import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from models.toy.digits import caption as digit_caption
from models.toy.shapes import caption as shapes_caption, parse_caption as parse_shapes_caption
from trainer.config import register

CONF = Path(__file__).resolve().parents[3] / "conf"
REWARD_CONFIGS = sorted(CONF.glob("reward/*.yaml"))

register()
sys.path.insert(0, str(Path(__file__).parent))  # fake_openai.py, the stand-in VLM server

# Rewards that parse their prompts need prompts in their grammar; any other reward gets GENERIC.
# A new prompt-parsing reward fails test_every_reward_config_scores_a_batch until it is added here.
PROMPTS = {
    "rewards.digits.DigitReward": [digit_caption(3), digit_caption(7)],
    "rewards.shapes.ShapesReward": [shapes_caption(parse_shapes_caption("a red circle")), "two blue squares"],
    "rewards.ocr.OcrReward": ['a sign that says "hello"', 'a mug with "steer" on it'],
}
GENERIC = ["a photo of a cat", "a red car"]

# Rewards whose config names a local checkpoint get a tiny random one (tiny_reward_models.py) through
# the same command-line overrides a user gives: {file stem: {key: name in `local_models`}}. A new config
# that needs files fails test_every_reward_config_scores_a_batch until it is added here.
LOCAL_MODELS = {
    "clip_score": {"path": "clip"},
    "pickscore": {"path": "clip", "processor_path": "clip"},
    "hpsv2": {"path": "clip"},
    "laion_aesthetic": {"path": "clip", "head": "aesthetic_head"},
    "dino_similarity": {"path": "dino", "references": "references"},
    "vlm_judge_local": {"path": "vlm"},
    "prompt_echo": {"path": "vlm"},
    "image_reward": {"path": "image_reward"},
    "winrate_vlm": {"judge.path": "vlm"},
}


@pytest.fixture(scope="module")
def local_models(tmp_path_factory) -> dict[str, str]:
    """{name: path} of tiny random checkpoints saved the way the real ones ship."""
    from tiny_reward_models import (
        save_aesthetic_head, save_reference_images, save_tiny_clip, save_tiny_dino, save_tiny_image_reward, save_tiny_llava,
    )

    root = tmp_path_factory.mktemp("reward_models")
    save_reference_images(root / "references")
    return {
        "clip": str(save_tiny_clip(root / "clip")),
        "aesthetic_head": str(save_aesthetic_head(root / "head.pth", widths=(16, 32, 16, 8, 4, 1))),
        "dino": str(save_tiny_dino(root / "dino")),
        "references": str(root / "references"),
        "vlm": str(save_tiny_llava(root / "vlm")),
        "image_reward": str(save_tiny_image_reward(root)[1]),
    }


@pytest.fixture(scope="module")
def endpoints():
    """{_target_: config keys to point at a local server} for the rewards that score over HTTP: a reward
    server (serving brightness) for RemoteReward, a fake OpenAI-compatible judge for OpenAIJudge."""
    from fake_openai import FakeOpenAI
    from rewards.image_stats import ImageStatistic
    from rewards.server import make_server

    server = make_server(ImageStatistic("brightness"), "brightness")
    server.start()
    with FakeOpenAI() as judge:
        yield {"rewards.remote.RemoteReward": {"url": server.url}, "rewards.vlm_judge.OpenAIJudge": {"base_url": judge.base_url}}
    server.close()


@pytest.fixture(scope="module")
def specs(local_models) -> dict[str, dict]:
    """{file stem: the reward's config as the trainer receives it}: composed into train.yaml, resolved, plain."""
    out = {}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for path in REWARD_CONFIGS:
            local = [f"rewards.probe.{key}={local_models[name]}" for key, name in LOCAL_MODELS.get(path.stem, {}).items()]
            cfg = compose("train", overrides=[f"+reward@rewards.probe={path.stem}", *local])
            out[path.stem] = OmegaConf.to_container(cfg.rewards.probe, resolve=True)
    return out


def build(spec: dict):
    """What RewardEnsemble does per reward: the weight is the ensemble's, the rest the constructor's."""
    spec = dict(spec)
    weight = spec.pop("weight", 1.0)
    assert isinstance(weight, (int, float)), f"weight must be a number, got {weight!r}"
    return instantiate(spec)


def test_there_are_reward_configs():
    assert len(REWARD_CONFIGS) >= 12, REWARD_CONFIGS  # 6 before the OCR/statistics configs, 6 added with them


@pytest.mark.parametrize("path", REWARD_CONFIGS, ids=lambda p: p.stem)
def test_every_reward_config_scores_a_batch(path, specs, endpoints):
    spec = {**specs[path.stem], **endpoints.get(specs[path.stem]["_target_"], {})}
    reward = build(spec)
    assert reward.input_kind in ("pixels", "video") and isinstance(reward.differentiable, bool)
    frames = (8,) if reward.input_kind == "video" else ()  # videos are [B, F, 3, H, W]
    images = torch.rand(2, *frames, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # The metadata the trainer passes: both samples of one prompt's group (win-rate rewards need it).
    out = reward(images, PROMPTS.get(spec["_target_"], GENERIC), [{"prompt_id": 0, "sample_id": i} for i in range(2)])
    scores = out["reward"] if isinstance(out, dict) else out
    assert torch.is_tensor(scores) and scores.shape == (2,) and scores.dtype == torch.float32, scores
    assert torch.isfinite(scores).all(), scores
    if isinstance(out, dict):
        for name, value in out.items():
            assert value.shape == (2,), (name, value)


def test_differentiable_configs_pass_gradients_to_pixels(specs):
    checked = 0
    for spec in specs.values():
        # Without building what is declared non-differentiable (some fit a model at start-up); wrappers
        # (video rewards) decide per instance, from the reward they wrap.
        if getattr(get_class(spec["_target_"]), "differentiable", None) is False:
            continue
        reward = build(spec)
        if not reward.differentiable:  # the instance may narrow it (digits_correct: a step function)
            continue
        frames = (8,) if reward.input_kind == "video" else ()
        images = torch.rand(2, *frames, 3, 32, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out = reward(images, PROMPTS.get(spec["_target_"], GENERIC))
        (out["reward"] if isinstance(out, dict) else out).sum().backward()
        assert images.grad is not None and images.grad.abs().sum() > 0, spec
        checked += 1
    assert checked >= 10  # brightness, saturation, contrast, high_frequency; clip_score, pickscore, hpsv2, laion_aesthetic, dino_similarity, image_reward


def test_jpeg_incompressibility_is_compressibility_with_the_opposite_sign(specs):
    plus, minus = specs["jpeg_incompressibility"], specs["jpeg_compressibility"]
    assert plus["_target_"] == minus["_target_"] and (plus["sign"], minus["sign"]) == (1.0, -1.0)
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand((1, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noise])
    up, down = build(plus)(images, ["", ""]), build(minus)(images, ["", ""])
    torch.testing.assert_close(up["jpeg_kb"], down["jpeg_kb"])
    torch.testing.assert_close(up["reward"], -down["reward"])
    assert up["reward"][1] > up["reward"][0] > 0  # noise is the less compressible: rewarded here
