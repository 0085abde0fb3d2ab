"""The shapes-world grammar, prompt split and renderer."""

import numpy as np
import pytest

from models.toy.shapes import (
    COLORS,
    KINDS,
    ObjectRequest,
    SceneSpec,
    all_specs,
    caption,
    parse_caption,
    render,
    sample_spec,
    shape_mask,
    split_specs,
    vocabulary,
)


def test_all_specs_counts_and_uniqueness():
    specs = all_specs()
    kinds = [s.kind for s in specs]
    assert (kinds.count("object"), kinds.count("count"), kinds.count("position")) == (12, 24, 12 * 11 * 4)
    assert len({caption(s) for s in specs}) == len(specs)
    assert specs == all_specs()  # deterministic order


def test_caption_examples():
    assert caption(SceneSpec("object", (ObjectRequest("red", "circle", 1),))) == "a red circle"
    assert caption(SceneSpec("count", (ObjectRequest("blue", "square", 2),))) == "two blue squares"
    spec = SceneSpec("position", (ObjectRequest("red", "circle", 1), ObjectRequest("green", "square", 1)), "left of")
    assert caption(spec) == "a red circle left of a green square"


def test_caption_parse_round_trip():
    for spec in all_specs():
        assert parse_caption(caption(spec)) == spec


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a purple circle",
        "a red circles",
        "two red circle",
        "one red circle",
        "four red circles",
        "A red circle",
        "a red circle ",
        "a red  circle",
        "a red circle left of a red circle",  # identical objects
        "two red circles left of a green square",
        "a red circle next to a green square",
        "a red circle left of",
    ],
)
def test_parse_rejects_out_of_grammar(text):
    with pytest.raises(ValueError, match="caption outside"):
        parse_caption(text)


def test_vocabulary_covers_every_caption_and_nothing_more():
    used = {w for s in all_specs() for w in caption(s).split()}
    assert set(vocabulary()) == used
    assert vocabulary() == sorted(used)


def test_split_deterministic_disjoint_stratified():
    train, heldout = split_specs(seed=0, heldout_fraction=0.2)
    assert (train, heldout) == split_specs(seed=0, heldout_fraction=0.2)
    assert split_specs(seed=1)[1] != heldout
    assert not set(train) & set(heldout)
    assert sorted(train + heldout, key=caption) == sorted(all_specs(), key=caption)
    for kind, n in (("object", 12), ("count", 24), ("position", 528)):
        n_out = sum(s.kind == kind for s in heldout)
        assert n_out == max(1, round(0.2 * n)), kind
    with pytest.raises(ValueError):
        split_specs(heldout_fraction=1.0)


def test_sample_spec_respects_kinds_and_covers_each():
    rng = np.random.default_rng(0)
    drawn = [sample_spec(rng) for _ in range(300)]
    assert {s.kind for s in drawn} == set(KINDS)
    assert {sample_spec(rng, kinds=("count",)).kind for _ in range(20)} == {"count"}
    assert all(s in set(all_specs()) for s in drawn)
    with pytest.raises(ValueError):
        sample_spec(rng, kinds=("colour",))


def test_shape_masks_fill_ratios():
    # Fill ratio (area / box) is what tells shapes apart: ~1, ~pi/4, ~1/2.
    for side in (8, 12, 24):
        assert shape_mask("square", side, side).mean() == 1.0
        assert 0.74 < shape_mask("circle", side, side).mean() < 0.86
        tri = shape_mask("triangle", side, side)
        assert 0.5 <= tri.mean() < 0.65  # pixel rows round the slope up, more so at small sides
        assert tri[0].sum() < tri[-1].sum() == side  # upright: apex on top, full base at the bottom
        assert np.array_equal(tri, tri[:, ::-1])  # isosceles


def _components(image):
    import cv2

    found = []
    for name, rgb in COLORS.items():
        mask = np.all(image == rgb, axis=-1).astype(np.uint8)
        n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        found += [(name, tuple(int(v) for v in stats[k][:4])) for k in range(1, n)]
    return found


@pytest.mark.parametrize("size", [32, 64])
def test_render_satisfies_spec(size):
    rng = np.random.default_rng(size)
    for _ in range(60):
        spec = sample_spec(rng)
        image = render(spec, rng, size=size)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        colors = {tuple(c) for c in image.reshape(-1, 3)}
        assert colors <= {(0, 0, 0), *COLORS.values()}  # hard edges: only palette colours
        comps = _components(image)
        assert len(comps) == sum(o.count for o in spec.objects)  # objects never touch
        gap = max(2, size // 16)
        for i, (_, (x, y, w, h)) in enumerate(comps):
            assert round(size / 4) <= w == h <= round(3 * size / 8)  # masks fill their whole box
            for _, (x2, y2, w2, h2) in comps[i + 1:]:
                assert x + w + gap <= x2 or x2 + w2 + gap <= x or y + h + gap <= y2 or y2 + h2 + gap <= y
        if spec.kind == "position" and spec.objects[0].color != spec.objects[1].color:
            # Distinct colours identify which component is which object.
            a, b = ([box for name, box in comps if name == o.color][0] for o in spec.objects)
            ax, ay, bx, by = a[0] + a[2] / 2, a[1] + a[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
            offset = {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}[spec.relation]
            assert offset >= max(a[2], b[2]) / 2, (caption(spec), a, b)


def test_render_is_reproducible_and_raises_when_impossible():
    spec = parse_caption("three red squares")
    assert np.array_equal(render(spec, np.random.default_rng(3)), render(spec, np.random.default_rng(3)))
    with pytest.raises(ValueError, match="size >= 16"):
        render(spec, np.random.default_rng(0), size=12)
    # Three squares of side >= 4 with 2 px gaps rarely fit a 16 px canvas at the first try.
    outcomes = []
    for seed in range(20):
        try:
            render(spec, np.random.default_rng(seed), size=16, max_tries=1)
            outcomes.append("placed")
        except RuntimeError as err:
            assert "could not place 'three red squares'" in str(err)
            outcomes.append("raised")
    assert "raised" in outcomes


def test_grid_layout_puts_objects_in_distinct_cells_and_parses_exactly():
    from rewards.shapes import parse_scene, score

    rng = np.random.default_rng(3)
    for _ in range(200):
        spec = sample_spec(rng)
        image = render(spec, rng, size=32, layout="grid")
        objects = parse_scene(image)
        cells = {(int(o.center[0] // 16), int(o.center[1] // 16)) for o in objects}
        assert len(cells) == len(objects) == sum(o.count for o in spec.objects)
        assert score(spec, objects)["correct"] == 1.0, caption(spec)
    with pytest.raises(ValueError, match="layout"):
        render(sample_spec(rng), rng, layout="spiral")
