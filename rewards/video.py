"""Rewards for videos [B, F, 3, H, W] in [0, 1]: image rewards lifted to clips, and temporal consistency.

- ``SegmentalVideoReward``: InstructVideo's segmental video reward (SegVR): split the clip into
  segments, score a few frames of each with any image reward, average within a segment, then
  aggregate the segments (mean, or min so that one bad segment is not averaged away).
- ``AttenuatedVideoReward``: after InstructVideo's temporally attenuated reward (TAR): every frame is
  scored, with weight decay^|f - anchor| normalised to sum to 1, so frames far from the anchor frame
  count less.
- ``TemporalConsistencyReward``: mean cosine similarity of consecutive frames' features (the pixels
  themselves by default), to keep motion from degrading into flicker while another reward is trained.
- ``MovingShapeReward``: the video toy's verifiable reward (models/toy/video.py): does the shape of the
  asked colour move in the asked direction.

All declare ``input_kind = "video"``; the first two are differentiable exactly when their image reward
is, the consistency reward when its features are.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

AGGREGATIONS = ("mean", "min")


def check_video(videos: torch.Tensor) -> None:
    if videos.ndim != 5 or videos.shape[2] != 3 or not videos.is_floating_point():
        raise ValueError(f"videos must be float [B, F, 3, H, W] in [0, 1], got {videos.dtype} {tuple(videos.shape)}")


def build_image_reward(reward):
    """The wrapped image reward: a config mapping ({_target_: ..., **kwargs}) or an already built one
    (Hydra's recursive instantiation builds nested ``_target_`` configs before the wrapper sees them)."""
    if isinstance(reward, Mapping):
        from hydra.utils import instantiate

        spec = dict(reward)
        if "weight" in spec:
            raise ValueError("the inner image reward takes no 'weight' (the video reward's own weight applies)")
        return instantiate(spec)
    if not callable(reward):
        raise TypeError(f"reward must be an image-reward config or a callable, got {type(reward).__name__}")
    return reward


def score_frames(reward, frames: torch.Tensor, prompts: list[str], metadata: list[dict] | None) -> torch.Tensor:
    """Score frames [B, K, 3, H, W] with an image reward: [B, K] (each frame gets its video's prompt
    and metadata, plus "frame": its index among the K)."""
    b, k = frames.shape[:2]
    meta = None if metadata is None else [{**m, "frame": j} for m in metadata for j in range(k)]
    out = reward(frames.reshape(b * k, *frames.shape[2:]), [p for p in prompts for _ in range(k)], meta)
    out = out["reward"] if isinstance(out, dict) else out
    return torch.as_tensor(out).float().reshape(b, k)


def segment_frames(num_frames: int, num_segments: int, frames_per_segment: int) -> torch.Tensor:
    """[S, K] frame indices: S contiguous, near-equal segments (boundaries floor(i * F / S)); in each,
    K frames evenly spread (segment of n frames, frame j at offset floor((2j + 1) n / 2K): centred)."""
    if num_segments < 1 or frames_per_segment < 1:
        raise ValueError(f"num_segments ({num_segments}) and frames_per_segment ({frames_per_segment}) must be >= 1")
    if num_frames < num_segments * frames_per_segment:
        raise ValueError(f"a {num_frames}-frame video cannot give num_segments ({num_segments}) x frames_per_segment "
                         f"({frames_per_segment}) distinct frames; lower one of them")
    bounds = [i * num_frames // num_segments for i in range(num_segments + 1)]
    rows = []
    for s in range(num_segments):
        start, n = bounds[s], bounds[s + 1] - bounds[s]
        rows.append([start + (2 * j + 1) * n // (2 * frames_per_segment) for j in range(frames_per_segment)])
    return torch.tensor(rows)


class SegmentalVideoReward:
    """Score sparse frames per segment with an image reward and aggregate (InstructVideo's SegVR).

    Args:
      reward: the image reward, as a config ({_target_: ..., **kwargs}) or built.
      num_segments: S contiguous segments of the clip.
      frames_per_segment: K frames scored per segment (evenly spread within it).
      aggregation: "mean" or "min" over the S segment scores (each the mean of its K frames).
    Returns {"reward": [B], "segment_<s>": [B] for each segment}.
    """

    input_kind = "video"

    def __init__(self, reward, num_segments: int = 4, frames_per_segment: int = 1, aggregation: str = "mean"):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if num_segments < 1 or frames_per_segment < 1:
            raise ValueError(f"num_segments ({num_segments}) and frames_per_segment ({frames_per_segment}) must be >= 1")
        self.reward = build_image_reward(reward)
        self.differentiable = bool(getattr(self.reward, "differentiable", False))
        self.num_segments, self.frames_per_segment, self.aggregation = num_segments, frames_per_segment, aggregation

    def __call__(self, videos: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> dict[str, torch.Tensor]:
        check_video(videos)
        idx = segment_frames(videos.shape[1], self.num_segments, self.frames_per_segment)  # [S, K]
        scores = score_frames(self.reward, videos[:, idx.flatten()], prompts, metadata)
        per_segment = scores.reshape(len(videos), self.num_segments, self.frames_per_segment).mean(-1)  # [B, S]
        total = per_segment.mean(1) if self.aggregation == "mean" else per_segment.amin(1)
        return {"reward": total, **{f"segment_{s}": per_segment[:, s] for s in range(self.num_segments)}}


def attenuation_weights(num_frames: int, decay: float, anchor: str) -> torch.Tensor:
    """[F] weights decay^|f - a| / sum, a = 0 ("first"), F - 1 ("last") or (F - 1) / 2 ("center")."""
    a = {"first": 0.0, "last": num_frames - 1.0, "center": (num_frames - 1) / 2}[anchor]
    w = torch.tensor(decay, dtype=torch.float64) ** (torch.arange(num_frames, dtype=torch.float64) - a).abs()
    return (w / w.sum()).float()


class AttenuatedVideoReward:
    """Per-frame image reward, weighted by a decay over time and normalised (after InstructVideo's TAR).

    Args:
      reward: the image reward, as a config or built.
      decay: in (0, 1]; frame f weighs decay^|f - anchor| (1 is the plain mean over frames).
      anchor: "first" | "center" | "last": the frame that weighs most.
      frame_stride: score every k-th frame only (cheaper; the weights are those of the kept frames).
    Returns {"reward": [B], "first_frame": [B], "last_frame": [B]} (the latter two unweighted scores).
    """

    input_kind = "video"

    def __init__(self, reward, decay: float = 0.9, anchor: str = "center", frame_stride: int = 1):
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        if anchor not in ("first", "center", "last"):
            raise ValueError(f"anchor must be 'first', 'center' or 'last', got {anchor!r}")
        if frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
        self.reward = build_image_reward(reward)
        self.differentiable = bool(getattr(self.reward, "differentiable", False))
        self.decay, self.anchor, self.frame_stride = float(decay), anchor, frame_stride

    def __call__(self, videos: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> dict[str, torch.Tensor]:
        check_video(videos)
        kept = videos[:, :: self.frame_stride]
        scores = score_frames(self.reward, kept, prompts, metadata)  # [B, F']
        w = attenuation_weights(kept.shape[1], self.decay, self.anchor).to(scores.device)
        return {"reward": scores @ w, "first_frame": scores[:, 0], "last_frame": scores[:, -1]}


class TemporalConsistencyReward:
    """Mean cosine similarity of consecutive frames' features, in [-1, 1] (in [0, 1] for pixels).

    Args:
      features: null uses the frames' pixels (optionally average-pooled to ``pool`` x ``pool``); else a
        feature extractor, as a config or built: a callable images [N, 3, H, W] -> [N, D], whose
        ``differentiable`` attribute (default False) says whether gradients reach the pixels.
      pool: for pixel features only: average-pool each frame to pool x pool first (null: full size), so
        the score tolerates sub-pixel motion and is cheaper.
    A frame whose features are all zero (a black frame, for pixels) has similarity 0 with its neighbours.
    Returns {"reward": [B], "min_pair": [B]} (the least similar consecutive pair).
    """

    input_kind = "video"

    def __init__(self, features=None, pool: int | None = None):
        if features is not None and pool is not None:
            raise ValueError("pool applies to pixel features only; set features=null or pool=null")
        if pool is not None and pool < 1:
            raise ValueError(f"pool must be >= 1, got {pool}")
        self.features = None if features is None else build_image_reward(features)
        self.pool = pool
        self.differentiable = True if self.features is None else bool(getattr(self.features, "differentiable", False))

    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        """[N, D] features of frames [N, 3, H, W]."""
        if self.features is not None:
            return torch.as_tensor(self.features(frames)).float().flatten(1)
        if self.pool is not None:
            frames = F.adaptive_avg_pool2d(frames, self.pool)
        return frames.flatten(1)

    def __call__(self, videos: torch.Tensor, prompts: list[str] | None = None, metadata=None) -> dict[str, torch.Tensor]:
        check_video(videos)
        b, f = videos.shape[:2]
        if f < 2:
            raise ValueError(f"temporal consistency needs at least 2 frames, got {f}")
        feats = self.frame_features(videos.float().reshape(b * f, *videos.shape[2:])).reshape(b, f, -1)
        sim = F.cosine_similarity(feats[:, 1:], feats[:, :-1], dim=-1)  # [B, F - 1]
        return {"reward": sim.mean(1), "min_pair": sim.amin(1)}


# ------------------------------------------------------------------------------------- the video toy
class MovingShapeReward:
    """Verifiable reward of the moving-shapes toy: the prompt's colour, found in every frame, moves the
    prompt's way.

    Per frame, the pixels nearest (within MAX_COLOR_DISTANCE, as the shapes reward) to the asked colour
    form the object; its centroid track gives the displacement first -> last visible frame.
    Components [B] (all in [0, 1] except displacement):
      present: share of frames where the colour covers at least min_area pixels
      direction: 1 iff present in >= half the frames and the displacement along the asked axis is at least
        min_travel of the frame size the right way and larger than the drift along the other axis
      displacement: signed travel along the asked direction, in frame widths (NaN when never present)
      reward: the component named by ``component`` ("direction" is strict accuracy).
    Not differentiable (thresholds).
    """

    input_kind = "video"
    differentiable = False
    MAX_COLOR_DISTANCE = 90.0

    def __init__(self, component: str = "direction", min_area: int = 3, min_travel: float = 0.15):
        if component not in ("direction", "present"):
            raise ValueError(f"component must be 'direction' or 'present', got {component!r}")
        self.component, self.min_area, self.min_travel = component, min_area, float(min_travel)

    def track(self, video: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
        """[F, 2] centroid (x, y) in pixels of the colour per frame of a uint8 [F, H, W, 3] clip; NaN where absent."""
        from models.toy.video import COLORS

        palette = np.array([(0, 0, 0), *COLORS.values()], dtype=np.float32)
        target = int(np.argmin(np.abs(palette - np.array(color, dtype=np.float32)).sum(1)))
        dist = np.linalg.norm(video[..., None, :].astype(np.float32) - palette, axis=-1)  # [F, H, W, P]
        mask = (dist.argmin(-1) == target) & (dist.min(-1) <= self.MAX_COLOR_DISTANCE)
        out = np.full((video.shape[0], 2), np.nan)
        for f, m in enumerate(mask):
            if m.sum() >= self.min_area:
                ys, xs = np.nonzero(m)
                out[f] = xs.mean(), ys.mean()
        return out

    def __call__(self, videos: torch.Tensor, prompts: list[str], metadata=None) -> dict[str, torch.Tensor]:
        from models.toy.video import COLORS, DIRECTIONS, parse_caption

        check_video(videos)
        arr = (videos.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy()
        size = videos.shape[-1]
        present, direction, travel = [], [], []
        for clip, prompt in zip(arr, prompts):
            spec = parse_caption(prompt)
            track = self.track(clip, COLORS[spec.color])
            ok = ~np.isnan(track[:, 0])
            present.append(ok.mean())
            if ok.sum() < 2:
                direction.append(0.0)
                travel.append(float("nan"))
                continue
            first, last = track[ok][0], track[ok][-1]
            dx, dy = DIRECTIONS[spec.direction]
            along = float((last - first) @ np.array([dx, dy])) / size
            across = float(abs((last - first) @ np.array([dy, dx]))) / size
            travel.append(along)
            direction.append(float(ok.mean() >= 0.5 and along >= self.min_travel and along > across))
        comps = {"present": present, "direction": direction, "displacement": travel}
        out = {k: torch.tensor(v, dtype=torch.float32) for k, v in comps.items()}
        return {"reward": out[self.component], **out}
