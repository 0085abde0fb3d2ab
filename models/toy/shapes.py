"""A GenEval-like toy world: captions about coloured shapes, and scenes that satisfy them.

Scenes are small RGB images (black background) of flat-coloured circles, squares and upright
isosceles triangles drawn with hard edges, so a weight-free parser (`rewards/shapes.py`) can
read them back almost exactly. Three prompt kinds mirror GenEval's single-object, counting and
position tasks:

    object:    "a red circle"
    count:     "two blue squares", "three yellow triangles"
    position:  "a red circle left of a green square"   (the first object relative to the second)

The prompt set is finite (564 captions), so `split_specs` can hold prompts out of training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import product
from typing import NamedTuple

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 30),
    "blue": (40, 80, 255),
    "yellow": (240, 220, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
KINDS: tuple[str, ...] = ("object", "count", "position")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
_NUMBER_WORDS = {1: "a", 2: "two", 3: "three"}
_COUNTS = (2, 3)  # n=1 is the `object` kind


class ObjectRequest(NamedTuple):
    """`count` objects of one colour and shape."""

    color: str
    shape: str
    count: int


@dataclass(frozen=True)
class SceneSpec:
    """What a prompt asks for.

    kind: one of KINDS. objects: one request for `object`/`count` kinds, two single-object
    requests for `position`. relation: one of RELATIONS for `position` (objects[0] stands in that
    relation to objects[1]), else None.
    """

    kind: str
    objects: tuple[ObjectRequest, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"SceneSpec.kind must be one of {KINDS}, got {self.kind!r}")
        for obj in self.objects:
            if obj.color not in COLORS or obj.shape not in SHAPES or obj.count not in _NUMBER_WORDS:
                raise ValueError(f"invalid object request {obj!r}")
        n_expected = 2 if self.kind == "position" else 1
        counts_ok = {"object": {1}, "count": set(_COUNTS), "position": {1}}[self.kind]
        if len(self.objects) != n_expected or any(o.count not in counts_ok for o in self.objects):
            raise ValueError(f"{self.kind} spec needs {n_expected} request(s) with count in {counts_ok}: {self}")
        if (self.kind == "position") != (self.relation in RELATIONS):
            raise ValueError(f"relation {self.relation!r} does not fit kind {self.kind!r}")
        if self.kind == "position" and self.objects[0][:2] == self.objects[1][:2]:
            raise ValueError(f"position objects must differ in colour or shape: {self}")


def caption(spec: SceneSpec) -> str:
    """The lowercase English caption of `spec`; `parse_caption` inverts it exactly."""
    words = [
        f"{_NUMBER_WORDS[o.count]} {o.color} {o.shape}{'s' if o.count > 1 else ''}" for o in spec.objects
    ]
    return f"{words[0]} {spec.relation} {words[1]}" if spec.kind == "position" else words[0]


_WORD_TO_NUMBER = {w: n for n, w in _NUMBER_WORDS.items()}
_PHRASE = rf"(a|two|three) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})(s?)"
_CAPTION_RE = re.compile(rf"{_PHRASE}(?: ({'|'.join(RELATIONS)}) {_PHRASE})?")


def parse_caption(text: str) -> SceneSpec:
    """Inverse of `caption`. Raises ValueError (naming `text`) for anything outside the grammar."""
    m = _CAPTION_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"caption outside the shapes grammar: {text!r}")
    g = m.groups()
    phrases = [g[0:4]] if g[4] is None else [g[0:4], g[5:9]]
    objects = []
    for number, color, shape, plural in phrases:
        n = _WORD_TO_NUMBER[number]
        if (n > 1) != (plural == "s"):
            raise ValueError(f"caption outside the shapes grammar: {text!r} (number and plural disagree)")
        objects.append(ObjectRequest(color, shape, n))
    kind = "position" if g[4] else ("count" if objects[0].count > 1 else "object")
    try:
        return SceneSpec(kind, tuple(objects), g[4])
    except ValueError as err:  # e.g. "two red circles left of ..." or identical position objects
        raise ValueError(f"caption outside the shapes grammar: {text!r} ({err})") from None


def all_specs() -> list[SceneSpec]:
    """Every prompt, in a fixed order: 12 object, 24 count, then 12*11*4 = 528 position specs."""
    pairs = list(product(COLORS, SHAPES))
    specs = [SceneSpec("object", (ObjectRequest(c, s, 1),)) for c, s in pairs]
    specs += [SceneSpec("count", (ObjectRequest(c, s, n),)) for c, s in pairs for n in _COUNTS]
    specs += [
        SceneSpec("position", (ObjectRequest(*a, 1), ObjectRequest(*b, 1)), rel)
        for a in pairs
        for b in pairs
        if a != b
        for rel in RELATIONS
    ]
    return specs


def split_specs(seed: int = 0, heldout_fraction: float = 0.2) -> tuple[list[SceneSpec], list[SceneSpec]]:
    """Deterministic train/held-out split of `all_specs()`, stratified by kind.

    Each kind holds out round(fraction * n) of its specs, at least 1 and at most n - 1, so both
    sides see every kind. Both lists keep `all_specs()` order.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    rng = np.random.default_rng(seed)
    specs = all_specs()
    heldout_ids: set[int] = set()
    for kind in KINDS:
        ids = [i for i, s in enumerate(specs) if s.kind == kind]
        n_out = min(max(round(heldout_fraction * len(ids)), 1), len(ids) - 1)
        heldout_ids.update(int(i) for i in rng.permutation(ids)[:n_out])
    train = [s for i, s in enumerate(specs) if i not in heldout_ids]
    heldout = [s for i, s in enumerate(specs) if i in heldout_ids]
    return train, heldout


def sample_spec(rng: np.random.Generator, kinds: tuple[str, ...] = KINDS) -> SceneSpec:
    """A kind uniformly from `kinds`, then a spec uniformly among that kind's specs."""
    unknown = set(kinds) - set(KINDS)
    if not kinds or unknown:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds}")
    kind = kinds[rng.integers(len(kinds))]
    pairs = list(product(COLORS, SHAPES))
    # Built directly rather than drawn from all_specs(): same distribution, ~100x cheaper.
    first = pairs[rng.integers(len(pairs))]
    if kind == "object":
        return SceneSpec(kind, (ObjectRequest(*first, 1),))
    if kind == "count":
        return SceneSpec(kind, (ObjectRequest(*first, int(rng.choice(_COUNTS))),))
    second = [p for p in pairs if p != first][rng.integers(len(pairs) - 1)]
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    return SceneSpec(kind, (ObjectRequest(*first, 1), ObjectRequest(*second, 1)), relation)


def vocabulary() -> list[str]:
    """Every word that can appear in a caption, sorted."""
    words = set(_NUMBER_WORDS.values()) | set(COLORS) | set(SHAPES) | {s + "s" for s in SHAPES}
    words |= {w for rel in RELATIONS for w in rel.split()}
    return sorted(words)


def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """Boolean mask [height, width] of `shape` filling a width x height box, sampled at pixel centres.

    circle: inscribed ellipse; square: the whole box; triangle: upright isosceles, apex at the top
    centre, base on the bottom row. Row i of the triangle uses the half-width at the row's lower
    edge, so the apex row is never empty and the mask's bounding box is the whole box.
    """
    # Offsets of pixel centres from the box centre in half-pixels, so every test below is exact
    # integer arithmetic: float rounding on boundary pixels would make shapes lopsided.
    dx = (2 * np.arange(width) + 1 - width)[None, :]
    dy = (2 * np.arange(height) + 1 - height)[:, None]
    if shape == "square":
        return np.ones((height, width), dtype=bool)
    if shape == "circle":  # (dx / width)^2 + (dy / height)^2 <= 1
        return (dx * height) ** 2 + (dy * width) ** 2 <= (width * height) ** 2
    if shape == "triangle":  # |dx| / width <= (row + 1) / height
        return np.abs(dx) * height <= width * (np.arange(height) + 1)[:, None]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _relation_holds(rel: str, a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """Boxes (x, y, side): a's centre is past b's by at least the larger half-side on rel's axis."""
    ax, ay, bx, by = a[0] + a[2] / 2, a[1] + a[2] / 2, b[0] + b[2] / 2, b[1] + b[2] / 2
    offset = {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}[rel]
    return offset >= max(a[2], b[2]) / 2


def render(
    spec: SceneSpec, rng: np.random.Generator, size: int = 32, max_tries: int = 500, layout: str = "free"
) -> np.ndarray:
    """A random scene satisfying `spec`: uint8 [size, size, 3], black background.

    layout "free": each object gets a random side in [size/4, 3*size/8] (8..12 px at 32), lies fully
    inside the canvas, and keeps a gap of at least max(2, size/16) px from every other object's box.
    layout "grid": objects sit in distinct cells of a 2x2 grid (side 5/16..3/8 of the canvas,
    centred in the cell with a 1/32-canvas jitter); far fewer layouts, so a tiny model learns the
    world in minutes on a CPU, and every GenEval-like task (count up to 3, colour, position) remains.
    Position relations hold with the margin of `_relation_holds`. Raises RuntimeError when no
    placement is found in `max_tries` attempts, ValueError for size < 16 (shapes under 4 px are
    unreadable) or an unknown layout.
    """
    if size < 16:
        raise ValueError(f"render needs size >= 16 so that shapes are at least 4 px, got {size}")
    if layout == "grid":
        return _render_grid(spec, rng, size, max_tries)
    if layout != "free":
        raise ValueError(f"layout must be 'free' or 'grid', got {layout!r}")
    lo, hi = round(size / 4), round(3 * size / 8)
    gap = max(2, size // 16)
    requests = [(o.color, o.shape) for o in spec.objects for _ in range(o.count)]
    for _ in range(max_tries):
        boxes: list[tuple[int, int, int]] = []  # (x, y, side) of each placed object
        for _ in requests:
            side = int(rng.integers(lo, hi + 1))
            x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            # Boxes closer than `gap` on both axes would touch or overlap.
            if any(x < bx + bs + gap and bx < x + side + gap and y < by + bs + gap and by < y + side + gap
                   for bx, by, bs in boxes):
                break
            boxes.append((x, y, side))
        else:
            if spec.relation is None or _relation_holds(spec.relation, boxes[0], boxes[1]):
                return _draw(requests, boxes, size)
    raise RuntimeError(f"could not place {caption(spec)!r} on a {size}x{size} canvas in {max_tries} tries")


def _render_grid(spec: SceneSpec, rng: np.random.Generator, size: int, max_tries: int) -> np.ndarray:
    """`render` with objects in distinct cells of a 2x2 grid (see `render`)."""
    cell = size // 2
    lo, hi = round(5 * size / 16), round(3 * size / 8)
    jitter = max(1, size // 32)
    requests = [(o.color, o.shape) for o in spec.objects for _ in range(o.count)]
    for _ in range(max_tries):
        cells = rng.permutation(4)[: len(requests)]
        boxes = []
        for c in cells:
            side = int(rng.integers(lo, hi + 1))
            x0, y0 = (c % 2) * cell + (cell - side) // 2, (c // 2) * cell + (cell - side) // 2
            dx, dy = (int(v) for v in rng.integers(-jitter, jitter + 1, size=2))
            boxes.append((min(max(x0 + dx, 0), size - side), min(max(y0 + dy, 0), size - side), side))
        if spec.relation is None or _relation_holds(spec.relation, boxes[0], boxes[1]):
            return _draw(requests, boxes, size)
    raise RuntimeError(f"could not place {caption(spec)!r} on a {size}x{size} grid in {max_tries} tries")


def _draw(requests: list[tuple[str, str]], boxes: list[tuple[int, int, int]], size: int) -> np.ndarray:
    """Paint each (colour, shape) request into its (x, y, side) box on a black uint8 [size, size, 3] canvas."""
    image = np.zeros((size, size, 3), dtype=np.uint8)
    for (color, shape), (x, y, side) in zip(requests, boxes):
        image[y:y + side, x:x + side][shape_mask(shape, side, side)] = COLORS[color]
    return image
