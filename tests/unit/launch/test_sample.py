"""launch.sample: images for image models, GIF/MP4 for video models ([B, F, 3, H, W] decodes), with any
adapter (the video case uses a stand-in adapter, not SD3)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from trained_checkpoints import make_checkpoint, tiny_wan_folder

import launch.sample as sample_mod
from launch.sample import SampleConfig, sample, write_video

# Saturated colours: a red/blue (RGB/BGR) swap or a frame-order mistake changes them completely.
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
H, W = 16, 24  # not square: a height/width swap changes the size


def _frames():
    frames = np.zeros((len(COLOURS), H, W, 3), dtype=np.uint8)
    for i, c in enumerate(COLOURS):
        frames[i] = c
        frames[i, 4:8, 2 * i : 2 * i + 4] = 255  # a white patch moving right
    return frames


def test_gif_holds_every_frame_in_order_at_the_fps(tmp_path):
    frames = _frames()
    [path] = write_video(frames, tmp_path / "v", ["gif"], fps=5)
    assert path == tmp_path / "v.gif"
    gif = Image.open(path)
    assert gif.n_frames == len(COLOURS) and gif.size == (W, H)
    for i in range(gif.n_frames):
        gif.seek(i)
        assert gif.info["duration"] == 200  # ms per frame at 5 fps
        got = np.asarray(gif.convert("RGB"))
        assert np.array_equal(got, frames[i]), i  # a handful of colours: the palette is exact


def test_mp4_holds_every_frame_in_order(tmp_path):
    import cv2

    frames = _frames()
    [path] = write_video(frames, tmp_path / "v", ["mp4"], fps=5)
    cap = cv2.VideoCapture(str(path))
    assert cap.get(cv2.CAP_PROP_FRAME_COUNT) == len(COLOURS) and cap.get(cv2.CAP_PROP_FPS) == 5
    for i, colour in enumerate(COLOURS):
        ok, bgr = cap.read()
        assert ok and bgr.shape == (H, W, 3)
        # Lossy codec: compare the frame's mean colour away from the white patch.
        mean = bgr[10:, :, ::-1].reshape(-1, 3).mean(0)
        assert np.abs(mean - np.array(colour)).max() < 20, (i, mean, colour)
    assert not cap.read()[0]
    cap.release()


def test_write_video_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="video_formats"):
        write_video(_frames(), tmp_path / "v", ["webm"], fps=5)
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        write_video(_frames()[0], tmp_path / "v", ["gif"], fps=5)


class VideoPolicy:
    """A stand-in video adapter: latents [C=F*3, h, w] decode to [B, F, 3, h, w]; velocity 0, so the
    deterministic sample is the initial noise itself."""

    frames, height, width = 3, 8, 12
    device = torch.device("cpu")

    def encode(self, prompts):
        return prompts

    def predict(self, x, sigma, cond, guidance_scale):
        return torch.zeros_like(x)

    def sigmas(self, num_steps):
        return torch.linspace(1.0, 0.0, num_steps + 1)

    def latent_shape(self, height, width):
        return (self.frames * 3, height, width)

    def decode(self, latents):
        b, _, h, w = latents.shape
        return (latents.reshape(b, self.frames, 3, h, w) / 2 + 0.5).clamp(0, 1)


def _video_run(monkeypatch, sampler_target="samplers.flow_sde.FlowSDESampler"):
    from omegaconf import OmegaConf

    run_cfg = OmegaConf.create({"sampler": {"_target_": sampler_target, "num_steps": 2, "eval_num_steps": 2,
                                            "guidance_scale": 1.0}})
    if "flow_sde" in sampler_target:
        run_cfg.sampler.noise_level = 0.7
    monkeypatch.setattr(sample_mod, "load_policy", lambda checkpoint, device: (VideoPolicy(), run_cfg))


def test_sample_writes_a_gif_and_mp4_per_video_sample(tmp_path, monkeypatch):
    _video_run(monkeypatch)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    out = tmp_path / "out"
    index = sample(SampleConfig(checkpoint="ckpt", prompts=str(prompts), out=str(out), num_per_prompt=2, batch=3, fps=4))
    rows = [json.loads(line) for line in index.read_text().splitlines()]
    assert [(r["prompt"], r["sample"]) for r in rows] == [("a cat", 0), ("a cat", 1), ("a dog", 0), ("a dog", 1)]
    for r in rows:
        assert r["files"] == [f"{r['prompt_index']:05d}_{r['sample']:02d}.gif", f"{r['prompt_index']:05d}_{r['sample']:02d}.mp4"]
        assert r["file"] == r["files"][0] and r["frames"] == 3 and r["fps"] == 4
        gif = Image.open(out / r["files"][0])
        assert gif.n_frames == 3 and gif.size == (VideoPolicy.width, VideoPolicy.height)
        assert (out / r["files"][1]).stat().st_size > 0
    assert len({r["seed"] for r in rows}) == 4
    assert not list(out.glob("*.png"))


def test_sample_argument_errors(tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    with pytest.raises(ValueError, match="video_formats"):
        sample(SampleConfig(checkpoint="ckpt", prompts=str(prompts), out=str(tmp_path / "o"), video_formats=["webm"]))
    _video_run(monkeypatch, "samplers.ode.ODESampler")
    with pytest.raises(ValueError, match="noise_level=0.5 needs a stochastic sampler"):
        sample(SampleConfig(checkpoint="ckpt", prompts=str(prompts), out=str(tmp_path / "o"), noise_level=0.5))


def test_sample_writes_pngs_for_the_toy_and_refuses_fps(tmp_path):
    ckpt, _ = make_checkpoint(tmp_path / "run", ["model=toy_digits"])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the digit three\nthe digit seven\n")
    out = tmp_path / "out"
    index = sample(SampleConfig(checkpoint=str(ckpt), prompts=str(prompts), out=str(out), num_steps=2, num_threads=1))
    rows = [json.loads(line) for line in index.read_text().splitlines()]
    assert [r["files"] for r in rows] == [["00000_00.png"], ["00001_00.png"]] and all("frames" not in r for r in rows)
    assert Image.open(out / "00000_00.png").size == (16, 16)
    with pytest.raises(ValueError, match="fps=4 applies to video models"):
        sample(SampleConfig(checkpoint=str(ckpt), prompts=str(prompts), out=str(tmp_path / "o2"), num_steps=2, fps=4))


def test_sample_writes_videos_with_the_wan_adapter(tmp_path):
    """The real video adapter (models.wan.WanPolicy on a tiny pixel-space Wan): GIF and MP4 with every frame."""
    import cv2

    ckpt, policy = make_checkpoint(tmp_path / "run", ["model=toy_video", f"model.path={tiny_wan_folder(tmp_path / 'wan')}"])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square moving left\n")
    out = tmp_path / "out"
    [row] = [json.loads(line) for line in sample(SampleConfig(
        checkpoint=str(ckpt), prompts=str(prompts), out=str(out), num_steps=2)).read_text().splitlines()]
    frames = policy.num_frames  # the toy_video config's (more than one)
    assert frames > 1 and row["files"] == ["00000_00.gif", "00000_00.mp4"] and row["frames"] == frames
    with Image.open(out / "00000_00.gif") as gif:
        assert gif.n_frames == frames and gif.size == (policy.width, policy.height)
    cap = cv2.VideoCapture(str(out / "00000_00.mp4"))
    assert cap.get(cv2.CAP_PROP_FRAME_COUNT) == frames and cap.get(cv2.CAP_PROP_FRAME_WIDTH) == policy.width
    cap.release()
