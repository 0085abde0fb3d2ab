"""Scene parsing and scoring for the shapes world: exact on clean renders, strict on corruptions."""

import math

import numpy as np
import pytest
import torch

from models.toy.shapes import COLORS, ObjectRequest, SceneSpec, caption, parse_caption, render, sample_spec
from rewards.shapes import DetectedObject, ShapesReward, parse_scene, score

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _score(spec, image):
    return score(spec, parse_scene(image))


def test_parse_single_object_exactly():
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[4:14, 20:30] = COLORS["blue"]  # a 10x10 square at x=20, y=4
    (obj,) = parse_scene(image)
    assert (obj.color, obj.shape, obj.bbox, obj.area) == ("blue", "square", (20, 4, 10, 10), 100)
    assert obj.centroid == pytest.approx((24.5, 8.5))


@pytest.mark.parametrize("size,n_scenes", [(32, 300), (64, 100)])
def test_render_parse_score_accuracy(size, n_scenes):
    rng = np.random.default_rng(1234 + size)
    results = []
    for _ in range(n_scenes):
        spec = sample_spec(rng)
        results.append(_score(spec, render(spec, rng, size=size)))
    assert np.mean([r["correct"] for r in results]) >= 0.98
    assert np.mean([r["total"] for r in results]) >= 0.98
    for r in results:
        assert all(0.0 <= v <= 1.0 for v in r.values())


def test_parse_tolerates_mild_noise():
    # A generator never hits the palette exactly; small colour noise must not change the parse.
    rng = np.random.default_rng(0)
    for _ in range(40):
        spec = sample_spec(rng)
        image = render(spec, rng, size=64).astype(np.float64) + rng.normal(0, 12, (64, 64, 3))
        assert _score(spec, np.clip(image, 0, 255).astype(np.uint8))["correct"] == 1.0, caption(spec)


def _corrupted(text, rendered_text, size=32, seed=0):
    spec = parse_caption(text)
    clean = _score(spec, render(spec, np.random.default_rng(seed), size))
    bad = _score(spec, render(parse_caption(rendered_text), np.random.default_rng(seed), size))
    assert clean["correct"] == 1.0 and clean["total"] == 1.0
    return bad


def test_wrong_color():
    bad = _corrupted("a red circle", "a blue circle")
    assert bad["correct"] == 0.0 and bad["color"] == 0.0 and bad["total"] == 0.0


def test_wrong_shape():
    bad = _corrupted("a red circle", "a red triangle")
    assert bad["correct"] == 0.0 and (bad["color"], bad["shape"], bad["count"], bad["exclusive"]) == (1.0, 0.0, 0.0, 0.0)
    assert bad["total"] == pytest.approx(1 / 4)


@pytest.mark.parametrize(
    "text,rendered,count",
    [
        ("a red circle", "two red circles", 0.0),
        ("two green squares", "a green square", 0.5),
        ("three yellow triangles", "two yellow triangles", 2 / 3),
        ("two green squares", "three green squares", 0.5),
    ],
)
def test_wrong_count(text, rendered, count):
    bad = _corrupted(text, rendered)
    # Too many or too few of the requested object: only count suffers (every object is a requested one).
    assert bad["correct"] == 0.0 and bad["count"] == pytest.approx(count) and bad["exclusive"] == 1.0
    assert bad["total"] == pytest.approx((count + 3) / 4)


def test_extra_object_of_another_kind():
    spec = parse_caption("a red circle")
    image = render(parse_caption("a red circle left of a green square"), np.random.default_rng(0))
    bad = _score(spec, image)
    assert bad["correct"] == 0.0 and bad["count"] == 1.0 and bad["color"] == 0.5 and bad["exclusive"] == 0.5
    assert bad["total"] == pytest.approx((1 + 0.5 + 1 + 0.5) / 4)


@pytest.mark.parametrize("relation", list(OPPOSITE))
def test_swapped_relation(relation):
    text = f"a red circle {relation} a green square"
    bad = _corrupted(text, f"a red circle {OPPOSITE[relation]} a green square", seed=3)
    assert bad["correct"] == 0.0 and bad["position"] == 0.0
    assert (bad["count"], bad["color"], bad["shape"], bad["exclusive"]) == (1.0, 1.0, 1.0, 1.0) and bad["total"] == 0.8


def test_relation_with_same_color_objects():
    # Same colour: only the shape tells the two objects apart.
    text = "a blue triangle above a blue circle"
    assert _corrupted(text, "a blue triangle below a blue circle", seed=5)["position"] == 0.0


@pytest.mark.parametrize("size", [32, 64])
def test_blank_and_noise(size):
    spec = parse_caption("a yellow square right of a red triangle")
    blank = np.zeros((size, size, 3), dtype=np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    assert parse_scene(blank) == [] and parse_scene(noise) == []
    for image in (blank, noise):
        result = _score(spec, image)
        assert result["correct"] == 0.0 and result["total"] == 0.0


def test_merged_objects_are_unknown_and_not_correct():
    # Two touching red squares form one 20x10 component: not a square, and not two of them.
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[5:15, 5:25] = COLORS["red"]
    (obj,) = parse_scene(image)
    assert obj.shape == "unknown"
    assert _score(parse_caption("two red squares"), image)["correct"] == 0.0


def test_objects_touching_at_a_corner_stay_separate():
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[2:12, 2:12] = COLORS["green"]
    image[12:22, 12:22] = COLORS["green"]
    assert [o.shape for o in parse_scene(image)] == ["square", "square"]
    assert _score(parse_caption("two green squares"), image)["correct"] == 1.0


def test_score_position_uses_box_centres():
    def obj(color, shape, x, y, side=10):
        ious = tuple(float(s == shape) for s in ("circle", "square", "triangle"))
        return DetectedObject(color, shape, (x + side / 2, y + side * 0.6), (x, y, side, side), side * side, ious)

    spec = SceneSpec("position", (ObjectRequest("red", "circle", 1), ObjectRequest("green", "square", 1)), "left of")
    assert score(spec, [obj("red", "circle", 0, 0), obj("green", "square", 5, 20)])["position"] == 1.0
    # Offset 2 px < 0.25 * 10: side by side is not "left of".
    assert score(spec, [obj("red", "circle", 0, 0), obj("green", "square", 2, 20)])["position"] == 0.0


def test_shapes_reward_batch():
    rng = np.random.default_rng(7)
    prompts = ["a red circle", "two blue squares", "a green triangle below a yellow circle"]
    images = np.stack([render(parse_caption(p), rng) for p in prompts])
    images[1] = render(parse_caption("three blue squares"), rng)  # wrong count in row 1
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255

    out = ShapesReward()(batch, prompts)
    assert set(out) == {"reward", "count", "color", "shape", "exclusive", "position", "total", "correct", "soft"}
    for value in out.values():
        assert value.shape == (3,) and value.dtype == torch.float32
    assert torch.equal(out["reward"], out["total"])
    assert out["correct"].tolist() == [1.0, 0.0, 1.0]
    assert out["count"][1].item() == pytest.approx(0.5)
    assert math.isnan(out["position"][0]) and math.isnan(out["position"][1]) and out["position"][2] == 1.0

    strict = ShapesReward(component="correct")(batch, prompts)
    assert torch.equal(strict["reward"], strict["correct"])


def test_shapes_reward_rejects_bad_inputs():
    images = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match="component"):
        ShapesReward(component="accuracy")
    with pytest.raises(ValueError, match="prompts"):
        ShapesReward()(images, ["a red circle"])
    with pytest.raises(ValueError, match="caption outside"):
        ShapesReward()(images, ["a red circle", "a cat"])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        ShapesReward()(images[:, :1], ["a red circle", "a red circle"])


def test_extra_objects_lower_exclusive_and_total_even_when_other_components_hold():
    """Hedging (drawing the requested objects plus extras) must not pay: `exclusive` drops and so does `total`."""
    from models.toy.shapes import COLORS, shape_mask

    spec = parse_caption("a red circle left of a blue square")
    image = np.zeros((32, 32, 3), np.uint8)
    for (x, y), color, shape in [((2, 4), "red", "circle"), ((20, 4), "blue", "square")]:
        image[y:y + 9, x:x + 9][shape_mask(shape, 9, 9)] = COLORS[color]
    clean = score(spec, parse_scene(image))
    image[20:29, 2:11][shape_mask("circle", 9, 9)] = COLORS["blue"]  # an extra blue circle
    hedged = score(spec, parse_scene(image))
    assert clean["exclusive"] == 1.0 and clean["correct"] == 1.0
    assert hedged["exclusive"] == pytest.approx(2 / 3) and hedged["correct"] == 0.0
    assert hedged["total"] < clean["total"]
    assert score(spec, [])["exclusive"] == 0.0


def test_soft_score_is_continuous_in_crispness_and_maxed_only_by_a_correct_scene():
    from models.toy.shapes import COLORS, shape_mask

    spec = parse_caption("two red circles")
    image = np.zeros((32, 32, 3), np.uint8)
    for x in (2, 18):
        image[4:14, x:x + 10][shape_mask("circle", 10, 10)] = COLORS["red"]
    clean = score(spec, parse_scene(image))
    assert clean["correct"] == 1.0 and clean["soft"] == pytest.approx(1.0)
    blurred = image.copy()
    blurred[4:6, 18:28] = COLORS["red"]  # square off the top of the second circle: a worse circle
    rough = score(spec, parse_scene(blurred))
    assert 0.5 < rough["soft"] < clean["soft"]
    image[20:30, 10:20][shape_mask("circle", 10, 10)] = COLORS["red"]  # a third red circle: hedging
    assert score(spec, parse_scene(image))["soft"] == pytest.approx(2 / 3)
    wrong_colour = np.where(image == np.array(COLORS["red"], np.uint8), np.array(COLORS["blue"], np.uint8), image)
    assert score(spec, parse_scene(wrong_colour))["soft"] == 0.0
