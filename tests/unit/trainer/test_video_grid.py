"""save_grid for videos (an animated GIF of per-frame grids) and log_image's choice of wandb media type."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer.metrics import MetricsWriter, save_grid


def test_video_grid_is_an_animated_gif_of_the_frames(tmp_path):
    videos = torch.zeros(2, 3, 3, 4, 4)
    for f in range(3):
        videos[0, f, 0] = 1.0 if f == 1 else 0.0  # sample 0: red only in frame 1
    videos[1, :, 2] = 1.0  # sample 1: blue throughout
    path = save_grid(videos, ["a", "b"], tmp_path / "samples" / "train_000001.png", scale=3)
    assert path == tmp_path / "samples" / "train_000001.gif" and path.is_file()
    assert not (tmp_path / "samples" / "train_000001.png").exists()
    with Image.open(path) as gif:
        assert gif.n_frames == 3 and gif.info["loop"] == 0
        frames = []
        for f in range(3):
            gif.seek(f)
            frames.append(np.array(gif.convert("RGB")))
    # Tile 0 is centred in a 120-px column: its 12x12 pixels start at x = (120 - 12) // 2.
    x0 = (120 - 12) // 2
    assert [tuple(fr[5, x0 + 5]) for fr in frames] == [(0, 0, 0), (255, 0, 0), (0, 0, 0)]
    assert all(tuple(fr[5, 120 + x0 + 5]) == (0, 0, 255) for fr in frames)


def test_image_grid_is_unchanged_png(tmp_path):
    path = save_grid(torch.rand(3, 3, 8, 8), ["a", "b", "c"], tmp_path / "eval.png")
    assert path == tmp_path / "eval.png"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (3 * 120, 8 * 3 + 26)


class _Run:
    def __init__(self):
        self.logged = []

    def log(self, row, step):
        self.logged.append((row, step))


def test_log_image_sends_gifs_as_video(tmp_path, monkeypatch):
    import wandb

    made = []
    monkeypatch.setattr(wandb, "Video", lambda path, format=None: made.append(("video", path, format)) or "V")
    monkeypatch.setattr(wandb, "Image", lambda path: made.append(("image", path)) or "I")
    writer = MetricsWriter(tmp_path, None, {}, enabled=False)
    writer.wandb = _Run()
    writer.log_image(3, "samples/train", Path("x/train.gif"))
    writer.log_image(4, "samples/train", Path("x/train.png"))
    assert made == [("video", "x/train.gif", "gif"), ("image", "x/train.png")]
    assert writer.wandb.logged == [({"samples/train": "V"}, 3), ({"samples/train": "I"}, 4)]
