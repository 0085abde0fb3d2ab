"""The digits-world classifier reward: accurate on held-out real digits, low on everything else."""

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from omegaconf import OmegaConf

from models.toy.digits import caption, load_split, split_indices, to_rgb_tensor
from rewards.digits import DigitReward, to_features
from rewards.ensemble import RewardEnsemble


@pytest.fixture(scope="module")
def reward():
    return DigitReward()


@pytest.fixture(scope="module")
def heldout():
    _, _, images, labels = load_split(seed=0)
    return (to_rgb_tensor(images) + 1) / 2, labels  # [N, 3, 16, 16] in [0, 1]


def _prompts(digits):
    return [caption(int(d)) for d in digits]


def test_heldout_real_digits_score_high(reward, heldout):
    images, labels = heldout
    out = reward(images, _prompts(labels))
    assert set(out) == {"reward", "prob", "correct"}
    for value in out.values():
        assert value.shape == (len(labels),) and value.dtype == torch.float32
    assert torch.equal(out["reward"], out["prob"])
    assert out["correct"].mean() >= 0.9
    assert set(out["correct"].unique().tolist()) <= {0.0, 1.0}
    wrong = reward(images, _prompts((labels + 1) % 10))
    assert out["prob"].mean() >= 0.85 and wrong["prob"].mean() <= 0.05
    assert wrong["correct"].mean() <= 0.05


def test_preprocessing_recovers_the_dataset_features(reward, heldout):
    # Channel mean, area pooling and the 0..16 rescale together must give back load_digits' rows.
    images, _ = heldout
    raw = load_digits().images[split_indices(seed=0)[1]].reshape(-1, 64)
    np.testing.assert_allclose(reward.probabilities(images), reward.classifier.predict_proba(raw), atol=1e-6)
    tinted = images * torch.tensor([1.0, 0.5, 0.0])[:, None, None]  # channel mean: half the gray value
    np.testing.assert_allclose(reward.probabilities(tinted), reward.probabilities(images / 2), atol=1e-6)


def test_any_resolution_scores_like_the_dataset(reward, heldout):
    images, labels = heldout
    small = reward(images[:50], _prompts(labels[:50]))["prob"]
    big = torch.nn.functional.interpolate(images[:50], scale_factor=4, mode="nearest")
    torch.testing.assert_close(reward(big, _prompts(labels[:50]))["prob"], small)


def test_blank_and_noise_score_low(reward):
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.zeros(10, 3, 16, 16),
        torch.ones(10, 3, 16, 16),
        torch.full((10, 3, 16, 16), 0.5),
        torch.rand(10, 3, 16, 16, generator=g),  # colour noise
        torch.rand(10, 1, 16, 16, generator=g).expand(-1, 3, -1, -1),  # gray noise
        torch.rand(10, 3, 64, 64, generator=g),  # finer noise: pooling flattens it towards gray
    ]
    for images in batches:
        out = reward(images, _prompts(range(10)))
        assert out["prob"].max() < 0.1 and out["correct"].sum() == 0


def test_component_correct_and_device(heldout):
    images, labels = heldout
    out = DigitReward(component="correct")(images[:20], _prompts(labels[:20]))
    assert torch.equal(out["reward"], out["correct"]) and out["reward"].device == images.device


def test_built_from_config_through_ensemble(heldout):
    images, labels = heldout
    spec = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[3] / "conf/reward/digits.yaml"))
    result = RewardEnsemble({"digits": spec})(images[:20], _prompts(labels[:20]))
    assert result.total.shape == (20,) and result.total.mean() > 0.8
    assert set(result.components) == {"digits/prob", "digits/correct"}


@pytest.mark.parametrize(
    "images,prompts,match",
    [
        (torch.zeros(2, 1, 16, 16), ["the digit one"] * 2, r"\[B, 3, H, W\]"),
        (torch.zeros(2, 3, 16), ["the digit one"] * 2, r"\[B, 3, H, W\]"),
        (torch.zeros(2, 3, 16, 16, dtype=torch.uint8), ["the digit one"] * 2, r"float"),
        (torch.zeros(2, 3, 16, 16), ["the digit one"], "1 prompts for 2 images"),
        (torch.zeros(2, 3, 16, 16), ["the digit one", "a red circle"], "a red circle"),
    ],
)
def test_bad_inputs_raise(reward, images, prompts, match):
    with pytest.raises(ValueError, match=match):
        reward(images, prompts)


def test_unknown_component_raises():
    with pytest.raises(ValueError, match="component"):
        DigitReward(component="total")


def test_torch_probabilities_equal_predict_proba(reward, heldout):
    # Real digits, their 2x upsampled copies, and noise: the torch evaluation of the fitted model must
    # give sklearn's numbers (a transposed coef or a missing intercept is off by far more than 1e-6).
    images, _ = heldout
    g = torch.Generator().manual_seed(1)
    batches = [images[:64], torch.nn.functional.interpolate(images[:16], scale_factor=2), torch.rand(16, 3, 16, 16, generator=g)]
    for batch in batches:
        gray = batch.clamp(0, 1).mean(dim=1)
        want = reward.classifier.predict_proba(to_features(gray))
        got = reward.torch_probabilities(batch)
        assert got.dtype == torch.float64 and got.shape == (len(batch), 11)
        np.testing.assert_allclose(got.numpy(), want, atol=1e-6, rtol=0)


def test_prob_is_differentiable_and_matches_finite_differences(reward, heldout):
    assert DigitReward.differentiable
    images, labels = heldout
    # Real digits with their contrast lowered to 0.8 stay inside (0, 1), where the clamp passes
    # gradients, and some probabilities sit mid-range (0.57 for the third) so the derivative is sizeable.
    x = (0.8 * images[:4] + 0.1).requires_grad_(True)
    prompts = _prompts(labels[:4])
    out = reward(x, prompts)
    assert out["reward"].requires_grad and not out["correct"].requires_grad
    (grad,) = torch.autograd.grad(out["prob"].sum(), x)
    direction = grad / grad.norm()  # steepest ascent: the directional derivative is |grad| (measured 1.9)
    h = 1e-2
    with torch.no_grad():
        up = reward(x + h * direction, prompts)["prob"].double().sum()
        down = reward(x - h * direction, prompts)["prob"].double().sum()
    numeric = float((up - down) / (2 * h))
    assert float(grad.norm()) > 0.1  # a zero gradient (detached somewhere) fails here
    assert float(grad.norm()) == pytest.approx(numeric, rel=1e-2)
