"""Run outputs: metrics.jsonl, wandb (offline by default), and captioned sample grids (PNG; animated GIF for videos)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont


class MetricsWriter:
    """Rank 0 writes one JSON object per step to ``metrics.jsonl`` and mirrors it to wandb."""

    def __init__(self, run_dir: Path, logger_cfg, config_dict: dict, enabled: bool, run_id: str | None = None):
        """``run_id``: the wandb run id, kept in checkpoints so a resumed run continues the same wandb run."""
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        if enabled and logger_cfg.backend == "wandb":
            import wandb

            self.wandb = wandb.init(
                project=logger_cfg.project, entity=logger_cfg.entity, mode=logger_cfg.mode, dir=str(run_dir),
                name=run_dir.name, config=config_dict, id=run_id, resume="allow" if run_id else None,
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def log_image(self, step: int, key: str, path: Path) -> None:
        """Log a grid written by ``save_grid``: a .gif (video samples) as wandb.Video, anything else as wandb.Image."""
        if self.wandb is not None:
            import wandb

            path = Path(path)
            media = wandb.Video(str(path), format="gif") if path.suffix == ".gif" else wandb.Image(str(path))
            self.wandb.log({key: media}, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _plain(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible rather than dropping the key
    return v


def save_grid(images: torch.Tensor, captions: list[str], path: Path, cols: int = 8, scale: int = 3,
              frame_ms: int = 250) -> Path:
    """Write images [N, 3, H, W] in [0, 1] as a PNG grid, each tile captioned (and optionally scored).

    Videos [N, F, 3, H, W] become an animated GIF of F grids (``path`` with the suffix .gif, ``frame_ms``
    per frame, looping). Returns the path written (the .gif one for videos).
    """
    if images.ndim == 5:
        frames = [_grid(images[:, f], captions, cols, scale) for f in range(images.shape[1])]
        path = Path(path).with_suffix(".gif")
        path.parent.mkdir(parents=True, exist_ok=True)
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
        return path
    canvas = _grid(images, captions, cols, scale)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _grid(images: torch.Tensor, captions: list[str], cols: int, scale: int) -> Image.Image:
    """The captioned grid of images [N, 3, H, W] in [0, 1] as one RGB image."""
    n = images.shape[0]
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    h, w = images.shape[-2] * scale, images.shape[-1] * scale
    cap_h = 26
    tile_w = max(w, 120)
    canvas = Image.new("RGB", (cols * tile_w, rows * (h + cap_h)), "white")
    font = ImageFont.load_default(size=10)
    draw = ImageDraw.Draw(canvas)
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, c = divmod(i, cols)
        x0, y0 = c * tile_w, r * (h + cap_h)
        canvas.paste(Image.fromarray(arr[i]).resize((w, h), Image.NEAREST), (x0 + (tile_w - w) // 2, y0))
        draw.multiline_text((x0 + 2, y0 + h + 1), _wrap(captions[i], 24), fill="black", font=font, spacing=1)
    return canvas


def _wrap(text: str, width: int) -> str:
    words, lines, cur = text.split(), [], ""
    for word in words:
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}".strip()
    lines.append(cur)
    return "\n".join(lines[:2])
