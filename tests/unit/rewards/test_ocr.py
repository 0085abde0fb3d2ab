"""The OCR text-rendering reward: edit similarity against hand-computed values, and real OCR on text
rendered with Pillow's bundled font (no system fonts, no downloads)."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from rewards.ocr import OcrReward, edit_similarity, levenshtein


@pytest.fixture(scope="module")
def reward():
    r = OcrReward()
    r.engine  # build the ONNX sessions once for the module (~0.2 s)
    return r


def render(text: str, size: int = 64, font_size: int = 16) -> torch.Tensor:
    """Black `text` centred on a white size x size canvas, as float [3, size, size] in [0, 1]."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=font_size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top), text, fill="black", font=font)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


# --- edit similarity: ground truth by hand ------------------------------------------------------


@pytest.mark.parametrize(
    "a, b, distance",
    [
        ("kitten", "sitting", 3),  # k->s, e->i, +g
        ("flaw", "lawn", 2),  # -f, +n
        ("ab", "ba", 2),  # a transposition is two edits
        ("", "abc", 3),
        ("abc", "abc", 0),
        ("hello", "helo", 1),
        ("sunday", "saturday", 3),  # +a, +t, n->r
    ],
)
def test_levenshtein_matches_hand_counts(a, b, distance):
    assert levenshtein(a, b) == distance
    assert levenshtein(b, a) == distance


@pytest.mark.parametrize(
    "a, b, similarity",
    [("kitten", "sitting", 4 / 7), ("flaw", "lawn", 0.5), ("ab", "ba", 0.0), ("", "abc", 0.0), ("abc", "abc", 1.0), ("", "", 1.0), ("hello", "helo", 0.8)],
)
def test_edit_similarity_is_one_minus_distance_over_longer_length(a, b, similarity):
    assert edit_similarity(a, b) == pytest.approx(similarity)


# --- prompt parsing and normalisation (no OCR) -------------------------------------------------


def test_wanted_text_from_quotes_with_normalisation():
    r = OcrReward()
    assert r.wanted_text('a sign that says "Hello World"') == "helloworld"
    assert r.wanted_text('a mug with “Café” on it') == "café"  # curly quotes
    assert r.wanted_text('"Hello" and "world"') == "helloworld"
    assert OcrReward(whitespace="collapse").wanted_text('says "  Hello \t World "') == "hello world"
    assert OcrReward(whitespace="keep", casefold=False).wanted_text('says "Hi  There"') == "Hi  There"
    assert OcrReward(pattern=r"text: (\w+)").wanted_text("a poster, text: STOP") == "stop"
    assert OcrReward(pattern=r"\d+").wanted_text("room 101, floor 3") == "1013"  # no group: whole matches
    assert OcrReward().normalize("ＨＩ，") == "hi,"  # full-width forms the recogniser emits


@pytest.mark.parametrize("prompt", ["a sign with no text", 'empty quotes ""', 'blank "   "'])
def test_prompt_without_quoted_text_raises_naming_it(prompt):
    with pytest.raises(ValueError, match="asks for no text") as info:
        OcrReward()(torch.ones(1, 3, 32, 32), [prompt])
    assert repr(prompt) in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [{"whitespace": "strip"}, {"det_limit_type": "mean"}, {"pattern": r"(a)(b)"}, {"min_text_score": 1.5}, {"intra_op_num_threads": 0}],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        OcrReward(**kwargs)


def test_construction_is_lazy_and_threads_are_set(reward):
    assert OcrReward()._engine is None
    # One intra-op thread in each ONNX session actually used (detector and recogniser).
    for session in (reward.engine.text_det.infer.session, reward.engine.text_rec.session.session):
        assert session.get_session_options().intra_op_num_threads == 1


# --- real OCR on rendered text ------------------------------------------------------------------


def test_rendered_text_scores_high_and_wrong_text_low(reward):
    words = ["hello", "steer", "flow 42"]
    images = torch.stack([render(w) for w in words] + [torch.ones(3, 64, 64)])
    right = [f'a sign that says "{w}"' for w in words] + ['a sign that says "cat"']
    out = reward(images, right)
    assert set(out) == {"reward", "exact"}
    for value in out.values():
        assert value.shape == (4,) and value.dtype == torch.float32
    assert (out["reward"][:3] > 0.8).all(), out
    assert (out["exact"][:3] == 1).all(), out
    assert out["reward"][3] == 0 and out["exact"][3] == 0  # blank canvas: nothing read

    wrong = ['says "zebra"', 'says "xylophone"', 'says "quiz"', 'says "dog"']
    low = reward(images, wrong)
    assert (low["reward"] < 0.4).all(), low
    assert (low["exact"] == 0).all()


def test_other_sizes_read(reward):
    images = torch.stack([render("cat", size=96, font_size=24), render("no", size=96, font_size=24)])
    out = reward(images, ['"cat"', '"cat"'])
    assert out["reward"][0] > 0.8 and out["reward"][1] < 0.4, out
    small = reward(render("hi", size=32, font_size=10)[None], ['"hi"'])
    assert small["reward"].item() > 0.8, small


def test_casefold_off_penalises_case(reward):
    image = render("Hello")[None]
    assert reward(image, ['says "HELLO"'])["exact"].item() == 1.0
    strict = OcrReward(casefold=False)
    strict._engine = reward.engine  # same models, different comparison
    assert strict(image, ['says "HELLO"'])["reward"].item() < 0.5


def test_shape_and_length_mismatch_raise(reward):
    with pytest.raises(ValueError, match="prompts"):
        reward(torch.ones(2, 3, 32, 32), ['"a"'])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        reward(torch.ones(3, 32, 32), ['"a"'])


def test_attributes():
    assert OcrReward.input_kind == "pixels" and OcrReward.differentiable is False


def test_check_prompts_refuses_prompts_without_text_and_names_the_text_toy():
    reward = OcrReward()
    reward.check_prompts(['a sign that says "cat"', 'a mug with "steer" on it'])
    with pytest.raises(ValueError, match=r"2 of 3 prompts quote no text to draw \(first: 'the digit three'\).*"
                                         r"experiment=toy_text"):
        reward.check_prompts(["the digit three", 'a sign that says "cat"', 'empty quotes "  "'])
    assert reward._engine is None  # checking prompts never loads the OCR models


def test_the_ensemble_names_the_reward_and_the_prompt_source():
    from rewards.ensemble import RewardEnsemble

    ensemble = RewardEnsemble({"ocr": {"_target_": "rewards.ocr.OcrReward"},
                               "jpeg": {"_target_": "rewards.jpeg.JpegCompressibility"}})
    ensemble.check_prompts(['a sign that says "cat"'], "data.prompts='x.txt'")  # jpeg has no check: skipped
    with pytest.raises(ValueError, match=r"reward 'ocr' \(eval_rewards.ocr\) cannot score data.eval_prompts='y.txt': "
                                         r"1 of 1 prompts"):
        ensemble.check_prompts(["the digit three"], "data.eval_prompts='y.txt'", "eval_rewards")
    ensemble.close()
