"""Generate with a trained checkpoint: ``python -m launch.sample checkpoint=PATH prompts=FILE out=DIR``.

Works for every model family: the adapter is rebuilt from the checkpoint's config.yaml (its
``model._target_``) and its trained weights loaded from policy.safetensors. Sampling is the run's
evaluation sampler (deterministic, the whole chain) unless ``noise_level`` is set.

Writes, per (prompt, sample), ``<prompt>_<sample>.png`` for an image model, or for a video model
(decoded output [B, F, 3, H, W]) an animated ``.gif`` and an ``.mp4`` (OpenCV's FFmpeg writer, which
the opencv-python-headless wheel bundles; ``video_formats=[gif]`` writes GIFs only). ``index.jsonl``
has one row per sample: {file, files, prompt, prompt_index, sample, seed, steps, guidance_scale,
checkpoint} plus {frames, fps} for videos.

The checkpoint's files are checked against their checksums before they are read. Like launch.export,
the samples are written to a hidden sibling folder and renamed into place when complete, and a
non-empty ``out`` is refused unless ``overwrite=true`` (which replaces it only once the new samples are
complete, so no stale file of an older sampling is left beside the new index).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from trainer.errors import UserError

VIDEO_FORMATS = ("gif", "mp4")
DEFAULT_FPS = 8


@dataclass
class SampleConfig:
    checkpoint: str = MISSING  # a run's checkpoints/step_<N> folder
    prompts: str = MISSING  # text file, one prompt per line
    out: str = MISSING  # folder to write; refused if it holds anything, unless overwrite=true
    overwrite: bool = False  # replace a non-empty `out` (only after the new samples are complete)
    max_prompt_chars: int = 2000  # longer prompts are refused (text encoders truncate them silently)
    num_per_prompt: int = 1
    seed: int = 0
    num_steps: Optional[int] = None  # default: the run's sampler.eval_num_steps
    guidance_scale: Optional[float] = None  # default: the run's sampler.guidance_scale
    noise_level: float = 0.0  # 0: the run's deterministic evaluation sampler; > 0: its SDE at this noise
    batch: int = 16
    fps: Optional[int] = None  # video models only: frames per second of the GIF/MP4 (default 8)
    video_formats: List[str] = field(default_factory=lambda: list(VIDEO_FORMATS))  # video models only
    device: str = "auto"
    num_threads: int = 0


ConfigStore.instance().store(name="sample", node=SampleConfig)


class SampleError(UserError, ValueError):
    """The sampling's arguments are wrong (every problem listed, each with its fix)."""


def load_policy(checkpoint: str | Path, device: str = "cpu", **model_overrides):
    """Rebuild a run's policy from ``checkpoint`` (a ``checkpoints/step_<N>`` folder) with its trained weights.

    The adapter class and its arguments come from the checkpoint's config.yaml (``model``), with
    ``model_overrides`` applied; no frozen reference copy is made. Returns (policy, run config).
    Raises FileNotFoundError naming the missing file when the folder is not a checkpoint.
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from trainer.checkpoint import CONFIG_FILE, POLICY_FILE, CheckpointError, check_files, load_safetensors
    from trainer.config import register

    register()  # the run's config.yaml may use ${sf.root:}
    ckpt = Path(checkpoint)
    for name in (CONFIG_FILE, POLICY_FILE):
        if not (ckpt / name).is_file():
            raise CheckpointError(f"checkpoint={str(checkpoint)!r} has no {name}; pass a run's checkpoints/step_<N> folder")
    check_files(ckpt, (CONFIG_FILE, POLICY_FILE))
    run_cfg = OmegaConf.load(ckpt / CONFIG_FILE)
    policy = instantiate(run_cfg.model, device=device, needs_reference=False, **model_overrides)
    state = load_safetensors(ckpt / POLICY_FILE)
    # Every trainable weight must come from the file: one left at its random init would be sampled
    # or exported silently.
    missing = sorted(k for k, p in policy.transformer.named_parameters() if p.requires_grad and k not in state)
    if missing:
        raise KeyError(f"{ckpt / POLICY_FILE} lacks {len(missing)} trainable weights of the model its config.yaml "
                       f"builds (first: {missing[:3]}); was the model config changed after training?")
    policy.load_trainable_state_dict(state)
    return policy, run_cfg


def write_video(frames, stem: Path, formats: list[str], fps: int) -> list[Path]:
    """Write one video, ``frames`` uint8 [F, H, W, 3] (numpy, RGB), as ``stem.<format>`` for each format.

    GIF: Pillow, every frame kept (no frame dropping or disposal tricks), looping forever.
    MP4: OpenCV's VideoWriter with the MPEG-4 Part 2 codec ("mp4v"), which every FFmpeg build
    OpenCV ships with encodes. Returns the paths written.
    Raises ValueError for an unknown format, RuntimeError if OpenCV cannot open an MP4 writer.
    """
    from PIL import Image

    unknown = [f for f in formats if f not in VIDEO_FORMATS]
    if unknown or not formats:
        raise ValueError(f"video_formats={list(formats)}: choose one or more of {list(VIDEO_FORMATS)}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3] uint8, got shape {tuple(frames.shape)}")
    paths = []
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        if fmt == "gif":
            images = [Image.fromarray(f) for f in frames]
            # GIF stores durations in 10 ms units: round 1000/fps to them, at least one unit.
            duration = max(10, round(100 / fps) * 10)
            images[0].save(path, save_all=True, append_images=images[1:], duration=duration, loop=0, disposal=1)
        else:
            import cv2

            h, w = frames.shape[1:3]
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (w, h))
            if not writer.isOpened():
                raise RuntimeError(f"OpenCV could not open an MP4 writer for {path} (no FFmpeg in this OpenCV build?); "
                                   "pass video_formats=[gif]")
            for f in frames:
                writer.write(f[:, :, ::-1].copy())  # OpenCV takes BGR
            writer.release()
        paths.append(path)
    return paths


def _sampler(run_cfg, cfg: SampleConfig, steps: int, guidance: float):
    """The run's sampler family with this command's steps, guidance and noise."""
    from hydra.utils import instantiate

    knobs = {"num_steps": steps, "eval_num_steps": steps, "guidance_scale": guidance}
    if cfg.noise_level == 0.0:
        return instantiate(run_cfg.sampler, **knobs).evaluation()
    if "noise_level" not in run_cfg.sampler:
        raise SampleError(f"noise_level={cfg.noise_level} needs a stochastic sampler, but the run used "
                         f"{run_cfg.sampler._target_}; drop noise_level")
    # The whole chain from noise (a partial chain would need clean samples to start from).
    return instantiate(run_cfg.sampler, noise_level=cfg.noise_level, start_step=0, **knobs)


def out_problems(out_arg: str, overwrite: bool) -> list[str]:
    """Why ``out`` cannot be written (a file; not empty without overwrite=true; not writable)."""
    from launch.run_dir import run_dir_problems

    out = Path(out_arg)
    if out.exists() and not out.is_dir():
        return [f"out={out_arg!r} is a file: pass a folder"]
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        return [f"out={out_arg!r} is not empty: pass another folder, or overwrite=true to replace it "
                "(the old contents are removed only after the new output is complete)"]
    # The output is staged beside `out`, so its parent must be writable too.
    return run_dir_problems(out, "out") or run_dir_problems(out.absolute().parent, f"out={out_arg!r}: the parent folder")


def staging(out: Path) -> Path:
    """An empty hidden sibling of ``out`` to write into (a leftover of a stopped run is removed)."""
    import shutil

    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, out: Path) -> None:
    """Move the complete ``tmp`` into place as ``out`` (an old ``out`` is removed only after the rename)."""
    import shutil

    if out.exists():
        old = out.with_name(f".{out.name}.replaced")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def problems(cfg: SampleConfig) -> list[str]:
    """Every reason the sampling cannot run, found before the model loads."""
    from trainer.prompts import PromptsError, load_prompts

    p = []  # the checkpoint is checked by load_policy (its files, their checksums), before the model loads
    try:
        load_prompts(cfg.prompts, "prompts", max(cfg.max_prompt_chars, 1))
    except PromptsError as e:
        p.append(str(e))
    p += out_problems(cfg.out, cfg.overwrite)
    positive = {"num_per_prompt": cfg.num_per_prompt, "batch": cfg.batch, "num_steps": cfg.num_steps, "fps": cfg.fps,
                "max_prompt_chars": cfg.max_prompt_chars}
    p += [f"{k} ({v}) must be > 0" for k, v in positive.items() if v is not None and v <= 0]
    zero_ok = {"seed": cfg.seed, "guidance_scale": cfg.guidance_scale, "noise_level": cfg.noise_level,
               "num_threads": cfg.num_threads}
    p += [f"{k} ({v}) must be >= 0" for k, v in zero_ok.items() if v is not None and v < 0]
    bad = [f for f in cfg.video_formats if f not in VIDEO_FORMATS]
    if bad or not cfg.video_formats:
        p.append(f"video_formats={list(cfg.video_formats)}: choose one or more of {list(VIDEO_FORMATS)}")
    return p


def sample(cfg: SampleConfig) -> Path:
    """Generate and write the images or videos; returns the index.jsonl path.

    Raises a UserError listing every problem with the arguments before the model loads. Whatever
    fails later leaves ``out`` as it was.
    """
    import shutil

    import torch

    from trainer.prompts import load_prompts

    found = problems(cfg)
    if found:
        raise SampleError("cannot sample:\n  - " + "\n  - ".join(found))
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    policy, run_cfg = load_policy(cfg.checkpoint, device)
    steps = cfg.num_steps or run_cfg.sampler.eval_num_steps
    guidance = cfg.guidance_scale if cfg.guidance_scale is not None else run_cfg.sampler.guidance_scale
    sampler = _sampler(run_cfg, cfg, steps, guidance)
    prompts = load_prompts(cfg.prompts, "prompts", cfg.max_prompt_chars)
    out = Path(cfg.out).absolute()
    tmp = staging(out)
    try:
        _write_samples(cfg, policy, sampler, prompts, steps, guidance, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, out)
    return out / "index.jsonl"


def _write_samples(cfg: SampleConfig, policy, sampler, prompts: list[str], steps: int, guidance: float, out: Path) -> None:
    import json

    import torch
    from PIL import Image
    from tqdm import tqdm

    from trainer.rng import STREAM_EVAL, seed_for
    from trainer.rollout import rollout_chunks

    pids = torch.arange(len(prompts)).repeat_interleave(cfg.num_per_prompt)
    sids = torch.arange(cfg.num_per_prompt).repeat(len(prompts))
    fps = cfg.fps or DEFAULT_FPS
    index = out / "index.jsonl"
    with index.open("w") as f, torch.no_grad():
        for start in tqdm(range(0, len(pids), cfg.batch), desc="sample", unit="batch"):
            p, s = pids[start : start + cfg.batch], sids[start : start + cfg.batch]
            _, decoded = rollout_chunks(policy, sampler, prompts, p, s, (cfg.seed, STREAM_EVAL, 0), steps, guidance,
                                        cfg.batch, policy.height, policy.width)
            video = decoded.dim() == 5  # [B, F, 3, H, W]
            if not video and cfg.fps is not None:
                raise SampleError(f"fps={cfg.fps} applies to video models; this model generates images "
                                 f"{list(decoded.shape)}: drop fps")
            # [0, 1] -> uint8 channels-last, the layout image and video writers take.
            arr = (decoded * 255).round().to(torch.uint8).movedim(-3, -1).numpy()
            for sample_arr, pi, si in zip(arr, p.tolist(), s.tolist()):
                stem = out / f"{pi:05d}_{si:02d}"
                if video:
                    files = [x.name for x in write_video(sample_arr, stem, cfg.video_formats, fps)]
                    extra = {"frames": int(sample_arr.shape[0]), "fps": fps}
                else:
                    Image.fromarray(sample_arr).save(stem.with_suffix(".png"))
                    files, extra = [stem.with_suffix(".png").name], {}
                f.write(json.dumps({
                    "file": files[0], "files": files, "prompt": prompts[pi], "prompt_index": pi, "sample": si,
                    "seed": seed_for(cfg.seed, STREAM_EVAL, 0, pi, si), "steps": steps, "guidance_scale": guidance,
                    "checkpoint": str(cfg.checkpoint), **extra,
                }) + "\n")


@hydra.main(config_path=None, config_name="sample", version_base="1.3")
def _main(cfg: SampleConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from trainer.errors import reporting_user_errors

    with reporting_user_errors(verbose=bool(HydraConfig.get().verbose)):
        index = sample(cfg)
    print(f"wrote {index} and the samples beside it")


def main() -> None:
    # No Hydra output folder or log file: the outputs are the samples and index.jsonl in `out`.
    sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]
    _main()


if __name__ == "__main__":
    main()
