"""The video toy: a coloured shape moving left, right, up or down, and a tiny pixel-space Wan model of it.

World: clips of ``FRAMES`` (4) frames of ``SIZE`` x ``SIZE`` (20) pixels, black background; one square or
circle of side ``SIDE`` (4) in one of the shapes world's four colours moves ``SPEED`` (4) pixels per frame
in the prompt's direction, from a random start that keeps it inside every frame.
Why these numbers: Wan has no absolute position embedding (3-D RoPE is relative), so a clip must be
defined by relations between frames, not by where it sits; and a step of exactly one 4-px patch makes
frame f+1 the token grid of frame f shifted by one token, which relative attention expresses directly.
(An 8-frame world with 1-px steps learnt colours but no coherent motion in 800 steps; a 16-px world whose
shapes started at a fixed edge learnt none in 2500 steps.) Prompts read
"a red square moving left": 4 colours x 2 shapes x 4 directions = 32 captions, of which a fixed 8
(every direction, every colour, both shapes once) are held out from pre-training and RL.

Model: the Wan 2.1 family itself (WanTransformer3DModel + UMT5EncoderModel + flow-matching scheduler) in
pixel space (no VAE: frames are generated as [-1, 1] RGB), saved as an ordinary diffusers folder that
``models.wan.WanPolicy`` loads exactly as it loads Wan 2.1. Wan rather than an SD3 toy with a frame
axis because the point of the toy is to run the real video adapter; at 4 x 20 x 20 pixels with
4 x 4 patches it is 100 tokens, fast enough on one CPU thread (see launch/pretrain_video_toy.py).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.toy.shapes import COLORS, shape_mask

SIZE, FRAMES, SIDE, SPEED = 20, 4, 4, 4
SHAPES = ("square", "circle")
# (dx, dy) per frame in image coordinates (y grows downwards).
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MAX_TOKENS = 8  # <bos> a red square moving left <eos>: 7, plus one spare
__all__ = ["COLORS", "SHAPES", "DIRECTIONS", "MotionSpec", "caption", "parse_caption", "render", "all_specs", "split"]


@dataclass(frozen=True)
class MotionSpec:
    color: str
    shape: str
    direction: str


def caption(spec: MotionSpec) -> str:
    return f"a {spec.color} {spec.shape} moving {spec.direction}"


def parse_caption(text: str) -> MotionSpec:
    """Inverse of ``caption``; raises ValueError naming the grammar for anything else."""
    words = text.split(" ")
    if (len(words) != 5 or words[0] != "a" or words[1] not in COLORS or words[2] not in SHAPES or words[3] != "moving"
            or words[4] not in DIRECTIONS):
        raise ValueError(f"{text!r} is not a moving-shapes caption: 'a <{'|'.join(COLORS)}> <{'|'.join(SHAPES)}> "
                         f"moving <{'|'.join(DIRECTIONS)}>'")
    return MotionSpec(words[1], words[2], words[4])


def all_specs() -> list[MotionSpec]:
    return [MotionSpec(c, s, d) for c in COLORS for s in SHAPES for d in DIRECTIONS]


def split() -> tuple[list[str], list[str]]:
    """(train, held-out) captions: held out are 8 combinations covering every direction, colour and shape."""
    colors, dirs = list(COLORS), list(DIRECTIONS)
    held = {MotionSpec(colors[i % 4], SHAPES[i % 2], dirs[(i + i // 4) % 4]) for i in range(8)}
    train = [caption(s) for s in all_specs() if s not in held]
    return train, [caption(s) for s in all_specs() if s in held]


def write_prompt_files(folder: Path) -> tuple[Path, Path]:
    """Write moving_shapes_train.txt / moving_shapes_heldout.txt (the RL job's prompt tables)."""
    train, heldout = split()
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "moving_shapes_train.txt", folder / "moving_shapes_heldout.txt"
    for path, lines in zip(paths, (train, heldout)):
        path.write_text("\n".join(lines) + "\n")
    return paths


def vocabulary() -> list[str]:
    return ["a", "moving", *COLORS, *SHAPES, *DIRECTIONS]


def render(spec: MotionSpec, rng: np.random.Generator, size: int = SIZE, frames: int = FRAMES) -> np.ndarray:
    """uint8 [frames, size, size, 3]: the shape moving SPEED px per frame, wholly inside every frame."""
    dx, dy = DIRECTIONS[spec.direction]
    travel = SPEED * (frames - 1)
    span = size - SIDE  # last valid top-left coordinate

    def start(d):  # along the motion: leave room for the whole path; across it: anywhere
        if d == 0:
            return int(rng.integers(0, span + 1))
        lo, hi = (0, span - travel) if d > 0 else (travel, span)
        if lo > hi:
            raise ValueError(f"a {size}-px frame cannot hold a {SIDE}-px shape travelling {travel} px")
        return int(rng.integers(lo, hi + 1))

    x0, y0 = start(dx), start(dy)
    mask = shape_mask(spec.shape, SIDE, SIDE)
    clip = np.zeros((frames, size, size, 3), dtype=np.uint8)
    for f in range(frames):
        x, y = x0 + dx * SPEED * f, y0 + dy * SPEED * f
        clip[f, y : y + SIDE, x : x + SIDE][mask] = COLORS[spec.color]
    return clip


def to_tensor(clips: np.ndarray) -> torch.Tensor:
    """uint8 [B, F, H, W, 3] -> the model's pixel latents [B, 3, F, H, W] in [-1, 1]."""
    return torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


# ------------------------------------------------------------------------------------------ the model
def build(seed: int = 0, layers: int = 4, heads: int = 4, head_dim: int = 16, text_dim: int = 32, patch: int = 4) -> dict:
    """Random components of the pixel-space Wan toy (transformer, text_encoder, tokenizer, scheduler)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from models.toy.build import build_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(vocabulary(), MAX_TOKENS)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=text_dim, d_kv=text_dim // 4, d_ff=2 * text_dim, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=3, decoder_start_token_id=0)).eval()
    transformer = WanTransformer3DModel(
        patch_size=(1, patch, patch), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=3, out_channels=3,
        text_dim=text_dim, freq_dim=64, ffn_dim=2 * heads * head_dim, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    # No shift: at 16 px the layout is decided at high noise, which a shift > 1 would rush through.
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return {"transformer": transformer, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def save(components: dict, folder: str | Path) -> Path:
    """A WanPipeline-style folder with no VAE (``vae: [null, null]``: pixel space)."""
    import diffusers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "WanPipeline", "_diffusers_version": diffusers.__version__, "boundary_ratio": None,
             "expand_timesteps": False, "transformer_2": [None, None], "vae": [None, None]}
    for name in ("scheduler", "text_encoder", "tokenizer", "transformer"):
        obj = components[name]
        library = "diffusers" if type(obj).__module__.startswith("diffusers") else "transformers"
        index[name] = [library, type(obj).__name__]
        obj.save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def pretrain(out: Path, steps: int = 1000, batch: int = 32, lr: float = 2e-3, seed: int = 0, cond_dropout: float = 0.1,
             eval_every: int = 200, eval_steps: int = 8, init_from: Path | None = None, log=print) -> list[dict]:
    """Flow-matching pre-training on rendered clips of the training captions (text encoder frozen, random).

    ``init_from``: continue from that model folder (e.g. an earlier run's ``out/model``) instead of a random init.
    Writes ``out/model`` (the last weights, transformer in fp16) and ``out/history.json``; returns the
    history of held-out direction accuracy (8-step ODE, one sample per held-out caption x 4 seeds).
    """
    from models.wan import WanPolicy
    from rewards.ensemble import RewardEnsemble
    from samplers.flow_sde import FlowSDESampler
    from trainer.distributed import World
    from trainer.evaluate import evaluate
    from trainer.flow_matching import flow_matching_loss
    from trainer.rng import generator

    train, heldout = split()
    if init_from is None:
        folder = save(build(seed), out / "model")
    else:
        import shutil

        folder = out / "model"
        shutil.copytree(init_from, folder, dirs_exist_ok=True)
    policy = WanPolicy(str(folder), finetune="full", needs_reference=False, dtype="float32", max_sequence_length=MAX_TOKENS,
                       num_frames=FRAMES, height=SIZE, width=SIZE)
    params = [p for p in policy.transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * s / steps)))
    rng, gen = np.random.default_rng(seed), generator(seed, 99)
    specs = [parse_caption(c) for c in train]
    reward = RewardEnsemble({"motion": {"_target_": "rewards.video.MovingShapeReward", "component": "direction"}})
    sampler = FlowSDESampler(noise_level=0.0, num_steps=eval_steps)
    world = World(0, 1, 0, 1, torch.device("cpu"))
    history, losses, t0 = [], [], time.time()
    for step in range(1, steps + 1):
        chosen = [specs[i] for i in rng.integers(len(specs), size=batch)]
        x0 = to_tensor(np.stack([render(s, rng) for s in chosen]))
        cond = policy.encode(["" if rng.random() < cond_dropout else caption(s) for s in chosen])
        loss = flow_matching_loss(lambda x, t: policy.predict(x, t, cond, 1.0), x0, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % eval_every == 0 or step == steps:
            policy.transformer.eval()
            metrics = evaluate(policy, sampler, [reward], heldout * 4, world, seed, 32, SIZE, SIZE)
            policy.transformer.train()
            row = {"step": step, "loss": float(np.mean(losses[-eval_every:])), "time_s": time.time() - t0, **metrics}
            history.append(row)
            log(json.dumps(row))
    # fp16 on disk halves the bytes; the adapter loads it back in fp32 on CPU.
    policy.transformer.to(torch.float16).save_pretrained(folder / "transformer")
    (out / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    return history


def ship(model: Path, dest: Path, runs: list[tuple[str, list[dict]]], seed: int = 0) -> dict:
    """Copy a pre-trained model folder to ``dest`` with a sample GIF and a model card.

    runs: [(the command that made the stage, its history rows)], oldest first. Returns the held-out
    scores re-measured on the copy (the card's numbers).
    """
    import shutil

    from models.wan import WanPolicy
    from rewards.ensemble import RewardEnsemble
    from samplers.flow_sde import FlowSDESampler
    from trainer.distributed import World
    from trainer.evaluate import evaluate

    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(model, dest)
    policy = WanPolicy(str(dest), finetune="full", needs_reference=False, max_sequence_length=MAX_TOKENS,
                       num_frames=FRAMES, height=SIZE, width=SIZE)
    _, heldout = split()
    reward = RewardEnsemble({"motion": {"_target_": "rewards.video.MovingShapeReward", "component": "direction"}})
    metrics = evaluate(policy, FlowSDESampler(noise_level=0.0, num_steps=8), [reward], heldout * 4,
                       World(0, 1, 0, 1, torch.device("cpu")), seed, 32, SIZE, SIZE, grid_path=dest / "samples.png")
    stages = "\n".join(f"{i + 1}. `{cmd}`: {rows[-1]['step']} steps, {rows[-1]['time_s']:.0f} s wall "
                       f"(loss {rows[-1]['loss']:.3f})" for i, (cmd, rows) in enumerate(runs))
    card = f"""# steerflow toy: video{SIZE} (Wan 2.1 family, pixel space)

A tiny text-to-video model of the Wan 2.1 family, shipped with steerflow so that the video training path
(models/wan.py, video rewards, GIF sample grids) runs end to end on a CPU. It is an ordinary diffusers
folder: `transformer/` (WanTransformer3DModel, 4 blocks, 4 heads x 16, patch 1x4x4, 3 input channels:
RGB pixels in [-1, 1], no VAE; stored in fp16), `text_encoder/` (UMT5EncoderModel, 1 layer, width 32,
random and frozen), `tokenizer/` (word-level), `scheduler/` (flow matching, shift 1).
Clips are {FRAMES} frames of {SIZE}x{SIZE}: one {SIDE}-px square or circle in one of four colours moving
{SPEED} px per frame left, right, up or down (`models/toy/video.py`); prompts read "a red square moving left".

## How it was made
Rectified-flow loss (`trainer/flow_matching.py`), uniform times, AdamW with warm-up and cosine decay,
10% empty captions, batch 32 clips rendered on the fly for the 24 training captions, seed {seed}, one CPU
thread on this project's shared 2-core machine (wall times include waiting for the CPU):
{stages}

## Held-out scores (this folder)
The 8 held-out captions x 4 noise seeds (a fixed evaluation stream), 8-step Euler ODE, no guidance,
scored by `rewards/video.py` MovingShapeReward (the asked colour present and moving the asked way):
- direction accuracy: {metrics['eval/motion']:.3f} (a random direction scores 0.25)
- colour present in a frame: {metrics['eval/motion/present']:.3f}
- mean travel along the asked direction: {metrics['eval/motion/displacement']:.3f} frame widths (the data: {SPEED * (FRAMES - 1) / SIZE:.3f})

It is imperfect (compare the accuracy with chance and the travel with the data's), which leaves RL room.
`samples.gif`: the held-out samples.
"""
    (dest / "README.md").write_text(card)
    return metrics
