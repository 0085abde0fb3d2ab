"""The text-world grammar and renderer: captions round-trip, and OCR reads the rendered words (the
ground truth the text toy is trained on and rewarded against)."""

import numpy as np
import pytest
import torch

from models.toy.text import WORDS, caption, parse_caption, render, vocabulary


def test_caption_round_trip_and_vocabulary():
    assert caption("owl") == 'a sign that says "owl"'
    assert [parse_caption(caption(w)) for w in WORDS] == list(WORDS)
    assert {'"', "a", "sign", "that", "says", *WORDS} == set(vocabulary())


@pytest.mark.parametrize("text", ['a sign that says "cow"', "a sign that says owl", 'a sign that says "owl" ', ""])
def test_parse_caption_rejects_and_names_text(text):
    with pytest.raises(ValueError, match="text grammar") as err:
        parse_caption(text)
    assert repr(text) in str(err.value)


def test_render_varies_but_stays_in_bounds_and_is_seeded():
    a = render("cat", np.random.default_rng(0))
    b = render("cat", np.random.default_rng(0))
    c = render("cat", np.random.default_rng(1))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # The word is drawn away from the border: the outer ring is background.
    ring = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    assert ring.min() >= 215


def test_ocr_reads_every_rendered_word():
    from rewards.ocr import OcrReward

    rng = np.random.default_rng(0)
    images = torch.from_numpy(np.stack([render(w, rng) for w in WORDS])).permute(0, 3, 1, 2).float() / 255
    out = OcrReward()(images, [caption(w) for w in WORDS])
    assert out["exact"].mean() >= 11 / 12, out
