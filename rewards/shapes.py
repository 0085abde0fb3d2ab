"""Weight-free verifiable reward for the toy shapes world (`models/toy/shapes.py`).

`parse_scene` reads an image back into coloured objects (palette thresholding, connected
components, template matching of the shape); `score` compares them with the prompt's
`SceneSpec`, GenEval-style; `ShapesReward` wraps both for batches of generated images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.toy.shapes import COLORS, SHAPES, SceneSpec, parse_caption, shape_mask
from rewards.grammar import refuse_outside

# A pixel takes the nearest palette colour (black included) only within this RGB distance. The
# closest two palette colours (red, yellow) are ~190 apart, so 90 never assigns a pixel ambiguously
# while tolerating the colour drift of a generator.
MAX_COLOR_DISTANCE = 90.0
# Components smaller than this fraction of the image are noise: the smallest rendered object, a
# triangle of side size/4, covers ~3% of the canvas.
MIN_AREA_FRACTION = 0.01
# A component whose best template IoU is below this is an "unknown" shape (a blob, merged objects).
MIN_SHAPE_IOU = 0.7
# Every shape in the world has a square box; a component much longer than wide is two merged
# objects or a bar, which would otherwise fit a stretched template well.
MAX_ASPECT_RATIO = 1.3
# `position` holds when the centres are offset along the relation's axis by at least this fraction
# of the larger box's extent on that axis. The renderer guarantees 0.5 (half the larger side);
# 0.25 leaves slack for imperfect boxes while still rejecting side-by-side-ish layouts.
RELATION_MARGIN = 0.25

_PALETTE_NAMES = ("black", *COLORS)
_PALETTE = np.array([(0, 0, 0), *COLORS.values()], dtype=np.float32)  # [5, 3]


@dataclass(frozen=True)
class DetectedObject:
    """One object found in a scene.

    color: a key of COLORS. shape: one of SHAPES, or "unknown" when no template fits well enough.
    centroid: pixel centroid (x, y). bbox: (x, y, width, height) in pixels. area: pixel count.
    """

    color: str
    shape: str
    centroid: tuple[float, float]
    bbox: tuple[int, int, int, int]
    area: int
    template_iou: tuple[float, ...]  # IoU with each of SHAPES' templates (all 0 for a non-square box)

    @property
    def center(self) -> tuple[float, float]:
        """Centre of the bounding box; unlike the pixel centroid it does not sag for triangles."""
        x, y, w, h = self.bbox
        return x + w / 2, y + h / 2


def _template_ious(mask: np.ndarray) -> tuple[float, ...]:
    """IoU of the component (bool [h, w], cropped to its box) with each shape template fitted to the box."""
    h, w = mask.shape
    if max(h, w) > MAX_ASPECT_RATIO * min(h, w):
        return tuple(0.0 for _ in SHAPES)
    return tuple(float((mask & t).sum() / (mask | t).sum()) for t in (shape_mask(s, w, h) for s in SHAPES))


def _classify_shape(ious: tuple[float, ...]) -> str:
    """The best-fitting shape, or "unknown" when even the best template fits poorly."""
    best = int(np.argmax(ious))
    return SHAPES[best] if ious[best] >= MIN_SHAPE_IOU else "unknown"


def parse_scene(image: np.ndarray) -> list[DetectedObject]:
    """Objects in a uint8 [H, W, 3] RGB image, ordered by colour, then by OpenCV label.

    Raises ValueError for any other dtype or shape.
    """
    import cv2  # deferred: only the shapes reward needs OpenCV

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"parse_scene expects uint8 [H, W, 3], got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    dist = np.linalg.norm(image[:, :, None, :].astype(np.float32) - _PALETTE, axis=-1)  # [H, W, 5]
    labels = np.where(dist.min(axis=-1) <= MAX_COLOR_DISTANCE, dist.argmin(axis=-1), -1)
    min_area = MIN_AREA_FRACTION * height * width
    objects = []
    for index, name in enumerate(_PALETTE_NAMES[1:], start=1):
        mask = (labels == index).astype(np.uint8)
        # 4-connectivity: objects touching only at a corner stay separate.
        n, comp, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=4)
        for k in range(1, n):  # label 0 is everything that is not this colour
            x, y, w, h, area = (int(v) for v in stats[k])
            if area < min_area:
                continue
            ious = _template_ious(comp[y:y + h, x:x + w] == k)
            shape = _classify_shape(ious)
            cx, cy = (float(v) for v in centroids[k])
            objects.append(DetectedObject(name, shape, (cx, cy), (x, y, w, h), area, ious))
    return objects


def _relation_holds(relation: str, a: DetectedObject, b: DetectedObject) -> bool:
    """Whether `a` is `relation` `b`, by box centres with the RELATION_MARGIN."""
    (ax, ay), (bx, by) = a.center, b.center
    horizontal = relation in ("left of", "right of")
    offset = {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}[relation]
    extent = max(a.bbox[2], b.bbox[2]) if horizontal else max(a.bbox[3], b.bbox[3])
    return offset >= RELATION_MARGIN * extent


def score(spec: SceneSpec, objects: list[DetectedObject]) -> dict[str, float]:
    """Per-component scores in [0, 1] of detected `objects` against `spec`.

    count: mean over requests of max(0, 1 - |n_detected - n| / n), counting exact colour+shape matches.
    color: (fraction of requested colours seen) * (fraction of objects in a requested colour; 1 if none).
    shape: fraction of requests with at least one object of the requested colour and shape.
    exclusive: fraction of detected objects that are of a requested colour and shape (0 when none
        is detected). Without it the mean rewards hedging: extra objects raise shape and position
        while making the image wrong, and RL finds that within a few dozen steps.
    position (position prompts only): 1 if some pair of best-matching objects (most
        attributes matched, at least one) stands in the relation, else 0.
    total: mean of the components above. correct: 1 iff counts are exact, there are no other
        objects (unknown shapes included) and the relation holds, else 0.
    """
    def matches(request, obj) -> int:  # attributes in common: 0, 1 or 2
        return (obj.color == request.color) + (obj.shape == request.shape)

    n_found = [sum(matches(r, o) == 2 for o in objects) for r in spec.objects]
    scores = {
        "count": float(np.mean([max(0.0, 1 - abs(f - r.count) / r.count) for f, r in zip(n_found, spec.objects)])),
        "shape": float(np.mean([f > 0 for f in n_found])),
    }
    wanted = {r.color for r in spec.objects}
    seen = {o.color for o in objects}
    in_wanted = np.mean([o.color in wanted for o in objects]) if objects else 1.0
    scores["color"] = len(wanted & seen) / len(wanted) * float(in_wanted)
    requested = {(r.color, r.shape) for r in spec.objects}
    scores["exclusive"] = float(np.mean([(o.color, o.shape) in requested for o in objects])) if objects else 0.0
    correct = all(f == r.count for f, r in zip(n_found, spec.objects))
    correct = correct and len(objects) == sum(r.count for r in spec.objects)
    if spec.kind == "position":
        best = []
        for r in spec.objects:
            top = max((matches(r, o) for o in objects), default=0)
            best.append([o for o in objects if top > 0 and matches(r, o) == top])
        # No need to exclude a == b: an object is offset 0 from itself, so never in a relation.
        holds = any(_relation_holds(spec.relation, a, b) for a in best[0] for b in best[1])
        scores["position"] = float(holds)
        correct = correct and holds  # with exact counts the best matches are the requested objects
    scores["total"] = float(np.mean(list(scores.values())))
    scores["correct"] = float(correct)
    scores["soft"] = _soft_score(spec, objects, scores.get("position"))
    return scores


def _soft_score(spec: SceneSpec, objects: list[DetectedObject], position: float | None) -> float:
    """A continuous score that only a correct scene maxes out: the dense reward for RL.

    fidelity = (sum over requested objects of the template IoU of the object matched to it) /
    max(#requested, #detected): each requested object is matched to a distinct detected object of
    its colour, best IoU with the requested shape first. Crisper shapes score more (the IoU is
    continuous, unlike the thresholded shape label), and every extra or missing object costs
    1/max(...), so hedging never pays. Position prompts average it with the relation (0 or 1).
    """
    used: set[int] = set()
    matched = 0.0
    for request in spec.objects:
        k = SHAPES.index(request.shape)
        candidates = sorted(
            (i for i, o in enumerate(objects) if o.color == request.color and i not in used),
            key=lambda i: -objects[i].template_iou[k],
        )[: request.count]
        used.update(candidates)
        matched += sum(objects[i].template_iou[k] for i in candidates)
    n_requested = sum(r.count for r in spec.objects)
    fidelity = matched / max(n_requested, len(objects))
    return fidelity if position is None else 0.5 * fidelity + 0.5 * position


COMPONENTS = ("count", "color", "shape", "exclusive", "position", "total", "correct", "soft")


class ShapesReward:
    """Reward for shapes-world prompts, from pixels, on CPU.

    component: which score is the scalar "reward": "soft" (continuous, maxed only by a correct
    scene: the RL reward), "total" (mean of the discrete components), "correct" (GenEval-style
    strict accuracy) or any single component.
    """

    input_kind = "pixels"
    differentiable = False

    def __init__(self, component: str = "total") -> None:
        if component not in COMPONENTS:
            raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
        self.component = component

    def check_prompts(self, prompts: list[str]) -> None:
        """Raise ValueError, before any image is drawn, for captions outside the shapes grammar."""
        refuse_outside(prompts, parse_caption, "shapes", "toy_shapes_geneval")

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata=None) -> dict[str, torch.Tensor]:
        """Score images [B, 3, H, W] (float in [0, 1]) against `prompts` (B shapes-world captions).

        Returns float32 [B] tensors on images.device: "reward" and every name in COMPONENTS;
        "position" is NaN for rows whose prompt has no relation. `metadata` is ignored. Raises
        ValueError on shape or length mismatch and on captions outside the grammar.
        """
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be float [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images")
        specs = [parse_caption(p) for p in prompts]  # before the pixel work: fail fast on bad prompts
        # Clamp because decoders overshoot [0, 1] slightly; round to match how images are saved.
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
        rows = [score(spec, parse_scene(img)) for spec, img in zip(specs, pixels)]
        out = {
            name: torch.tensor([r.get(name, float("nan")) for r in rows], dtype=torch.float32, device=images.device)
            for name in COMPONENTS
        }
        out["reward"] = out[self.component]
        return out
