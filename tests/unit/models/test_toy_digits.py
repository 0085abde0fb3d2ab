"""The digits-world grammar, stratified split and pixel-space target."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from models.toy.digits import WORDS, caption, load_split, parse_caption, split_indices, to_rgb_tensor, vocabulary


def test_caption_round_trip_and_examples():
    assert caption(0) == "the digit zero" and caption(7) == "the digit seven"
    assert [parse_caption(caption(d)) for d in range(10)] == list(range(10))
    assert len({caption(d) for d in range(10)}) == 10
    assert vocabulary() == sorted({"the", "digit", *WORDS})
    assert all(w in vocabulary() for d in range(10) for w in caption(d).split())


@pytest.mark.parametrize("text", ["the digit ten", "the digit Seven", "digit seven", "the digit seven ", "", "7"])
def test_parse_caption_rejects_and_names_text(text):
    with pytest.raises(ValueError, match="digits grammar") as err:
        parse_caption(text)
    assert repr(text) in str(err.value)


@pytest.mark.parametrize("digit", [-1, 10])
def test_caption_rejects_out_of_range(digit):
    with pytest.raises(ValueError, match="0..9"):
        caption(digit)


def test_split_deterministic_disjoint_stratified():
    train, held = split_indices(seed=0)
    again_train, again_held = split_indices(seed=0)
    assert np.array_equal(train, again_train) and np.array_equal(held, again_held)
    assert not np.array_equal(held, split_indices(seed=1)[1])
    assert len(np.intersect1d(train, held)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, held])), np.arange(1797))
    labels = load_digits().target
    for d in range(10):
        n_d = (labels == d).sum()
        assert (labels[held] == d).sum() == round(0.2 * n_d)  # every digit held out at the same rate
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_indices(heldout_fraction=1.0)


def test_load_split_matches_indices_and_upsamples_exactly():
    data = load_digits()
    train_x, train_y, held_x, held_y = load_split(seed=0)
    train, held = split_indices(seed=0)
    assert train_x.shape == (len(train), 16, 16) and train_x.dtype == np.float32
    assert np.array_equal(train_y, data.target[train]) and np.array_equal(held_y, data.target[held])
    assert train_x.min() == 0.0 and train_x.max() == 1.0
    # Nearest-neighbour blocks: every 2x2 block is constant and pools back to the dataset pixel.
    assert np.array_equal(held_x[:, ::2, ::2], held_x[:, 1::2, 1::2])
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(held_x)[:, None], 8)[:, 0].numpy()
    np.testing.assert_array_equal(pooled * 16, data.images[held])
    big = load_split(seed=0, size=32)[2]
    np.testing.assert_array_equal(F.adaptive_avg_pool2d(torch.from_numpy(big)[:, None], 8)[:, 0].numpy() * 16,
                                  data.images[held])
    with pytest.raises(ValueError, match="multiple of 8"):
        load_split(size=12)


def test_to_rgb_tensor_range_and_channels():
    images = np.array([[[0.0, 1.0], [0.5, 0.25]]], dtype=np.float32)
    rgb = to_rgb_tensor(images)
    assert rgb.shape == (1, 3, 2, 2) and rgb.dtype == torch.float32
    expected = torch.tensor([[-1.0, 1.0], [0.0, -0.5]])
    for c in range(3):
        assert torch.equal(rgb[0, c], expected)
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        to_rgb_tensor(images[0])
