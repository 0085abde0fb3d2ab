"""Pre-train the embedded toy (a pixel-space SD3-family model) on the shapes world.

Supervised flow matching on rendered scenes of the training prompts, with 10% empty captions so
classifier-free guidance works. Held-out prompts are scored with the same verifiable reward the RL
job uses; the script keeps every snapshot's score so the shipped base can be one that leaves RL room.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from models.sd3 import SD3Policy
from models.toy import shapes
from models.toy.build import build_toy, save_toy
from rewards.ensemble import RewardEnsemble
from samplers.flow_sde import FlowSDESampler
from trainer.distributed import World
from trainer.evaluate import evaluate
from trainer.flow_matching import flow_matching_loss
from trainer.rng import generator


def write_prompt_files(folder: Path, seed: int = 0) -> tuple[list[str], list[str]]:
    """Write shapes_train.txt / shapes_heldout.txt (the RL job's prompt tables) and return them."""
    train, heldout = shapes.split_specs(seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    tr = [shapes.caption(s) for s in train]
    ho = [shapes.caption(s) for s in heldout]
    # Shuffle the held-out order once so any prefix (data.eval_size) mixes the three kinds.
    ho = [ho[i] for i in np.random.default_rng(seed).permutation(len(ho))]
    (folder / "shapes_train.txt").write_text("\n".join(tr) + "\n")
    (folder / "shapes_heldout.txt").write_text("\n".join(ho) + "\n")
    return tr, ho


@dataclass
class ToyWorld:
    """What pre-training needs from a toy world: its words, data, prompt tables and eval reward."""

    name: str
    vocabulary: list[str]
    patch_size: int
    train_prompts: list[str]
    eval_prompts: list[str]
    sample: Callable[[np.random.Generator, int], tuple[torch.Tensor, list[str]]]  # -> x0 [B,3,H,W] in [-1,1], captions
    rewards: dict  # RewardEnsemble spec: the first entry is the headline score ("correct"-like)


def shapes_world(prompt_dir: Path, seed: int, image_size: int, layout: str) -> ToyWorld:
    train_prompts, heldout = write_prompt_files(prompt_dir, seed)
    specs = [shapes.parse_caption(p) for p in train_prompts]

    def sample(rng, batch):
        chosen = [specs[i] for i in rng.integers(len(specs), size=batch)]
        x0 = torch.from_numpy(np.stack([shapes.render(s, rng, size=image_size, layout=layout) for s in chosen]))
        return x0.permute(0, 3, 1, 2).float() / 127.5 - 1.0, [shapes.caption(s) for s in chosen]

    rewards = {"shapes": {"_target_": "rewards.shapes.ShapesReward", "component": "correct"},
               "shapes_total": {"_target_": "rewards.shapes.ShapesReward", "component": "total"}}
    return ToyWorld("shapes", shapes.vocabulary(), 4, train_prompts, heldout, sample, rewards)


def digits_world(prompt_dir: Path, seed: int, image_size: int, eval_repeats: int = 10) -> ToyWorld:
    """sklearn's digits: ten prompts, so evaluation holds out seeds (a fixed eval noise stream), not prompts."""
    from models.toy import digits

    train_x, train_y, _, _ = digits.load_split(seed=seed, size=image_size)
    images = digits.to_rgb_tensor(train_x)
    prompts = [digits.caption(d) for d in range(10)]
    eval_prompts = prompts * eval_repeats
    prompt_dir.mkdir(parents=True, exist_ok=True)
    (prompt_dir / "digits_train.txt").write_text("\n".join(prompts) + "\n")
    (prompt_dir / "digits_eval.txt").write_text("\n".join(eval_prompts) + "\n")

    def sample(rng, batch):
        idx = rng.integers(len(images), size=batch)
        return images[idx], [digits.caption(int(train_y[i])) for i in idx]

    rewards = {"digits": {"_target_": "rewards.digits.DigitReward", "component": "correct", "size": image_size},
               "digits_prob": {"_target_": "rewards.digits.DigitReward", "component": "prob", "size": image_size}}
    return ToyWorld("digits", digits.vocabulary(), 2, prompts, eval_prompts, sample, rewards)


def text_world(prompt_dir: Path, seed: int, image_size: int, eval_repeats: int = 8) -> ToyWorld:
    """Words on signs (Pillow's font): twelve prompts, so evaluation holds out seeds, like digits."""
    from models.toy import text

    prompts = [text.caption(w) for w in text.WORDS]
    eval_prompts = prompts * eval_repeats
    prompt_dir.mkdir(parents=True, exist_ok=True)
    (prompt_dir / "text_train.txt").write_text("\n".join(prompts) + "\n")
    (prompt_dir / "text_eval.txt").write_text("\n".join(eval_prompts) + "\n")

    def sample(rng, batch):
        words = [text.WORDS[i] for i in rng.integers(len(text.WORDS), size=batch)]
        x0 = torch.from_numpy(np.stack([text.render(w, rng, size=image_size) for w in words]))
        return x0.permute(0, 3, 1, 2).float() / 127.5 - 1.0, [text.caption(w) for w in words]

    rewards = {"ocr": {"_target_": "rewards.ocr.OcrReward"}}
    return ToyWorld("text", text.vocabulary(), 4, prompts, eval_prompts, sample, rewards)


def make_world(name: str, prompt_dir: Path, seed: int, image_size: int, layout: str) -> ToyWorld:
    if name == "shapes":
        return shapes_world(prompt_dir, seed, image_size, layout)
    if name == "digits":
        return digits_world(prompt_dir, seed, image_size)
    if name == "text":
        return text_world(prompt_dir, seed, image_size)
    raise ValueError(f"world must be 'shapes', 'digits' or 'text', got {name!r}")


def pretrain_toy(
    out: Path, steps: int, batch: int, lr: float, eval_every: int, image_size: int, seed: int, prompt_dir: Path,
    eval_prompts: int = 128, cond_dropout: float = 0.1, guidance_scale: float = 1.0, eval_steps: int = 10,
    t_sampling: str = "uniform", layout: str = "grid", init_from: Path | None = None, decay: bool = False,
    world_name: str = "shapes", warmup: int = 200,
) -> list[dict]:
    """Train (from scratch, or on from the snapshot ``init_from``) and save ``out/step_<N>`` at every evaluation.

    ``decay`` anneals the learning rate to 10% with a cosine after the warm-up (sharper samples at the end).

    Returns the evaluation history [{step, loss, eval/...}], also written to ``out/history.json``.
    """
    world = World(0, 1, 0, 1, torch.device("cpu"))
    toy = make_world(world_name, prompt_dir, seed, image_size, layout)
    heldout = toy.eval_prompts
    if init_from is None:
        init = save_toy(build_toy(toy.vocabulary, image_size=image_size, patch_size=toy.patch_size, seed=seed), out / "init")
    else:
        import shutil

        init = out / "init"
        shutil.copytree(init_from, init, dirs_exist_ok=True, ignore=shutil.ignore_patterns("samples.png", "README.md"))
    policy = SD3Policy(str(init), finetune="full", needs_reference=False, max_sequence_length=0,
                       height=image_size, width=image_size, device="cpu")
    params = [p for p in policy.transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    def lr_factor(s: int) -> float:
        warm = min(1.0, (s + 1) / warmup)  # warm-up: stable early steps from a random init
        return warm * (0.55 + 0.45 * math.cos(math.pi * s / steps)) if decay else warm

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    rng = np.random.default_rng(seed)
    gen = generator(seed, 99)
    reward = RewardEnsemble(toy.rewards)
    sampler = FlowSDESampler(noise_level=0.0, num_steps=eval_steps, guidance_scale=guidance_scale)
    history, losses = [], []
    settings = dict(steps=steps, batch=batch, lr=lr, image_size=image_size, seed=seed, layout=layout,
                    t_sampling=t_sampling, cond_dropout=cond_dropout, guidance_scale=guidance_scale,
                    init_from=str(init_from) if init_from else None, decay=decay, world=world_name,
                    warmup=warmup)
    (out / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    t0 = time.time()
    bar = tqdm(range(1, steps + 1), desc="pretrain toy", dynamic_ncols=True)
    for step in bar:
        x0, caps = toy.sample(rng, batch)
        caps = ["" if rng.random() < cond_dropout else c for c in caps]
        cond = policy.encode(caps)
        loss = flow_matching_loss(lambda x, t: policy.predict(x, t, cond, 1.0), x0, gen, t_sampling)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)
        if step % eval_every == 0 or step == steps:
            policy.transformer.eval()
            metrics = evaluate(policy, sampler, [reward], heldout[:eval_prompts], world, seed, 64, image_size, image_size,
                               grid_path=out / f"step_{step:06d}" / "samples.png")
            policy.transformer.train()
            row = {"step": step, "loss": float(np.mean(losses[-eval_every:])), "time_s": time.time() - t0, **metrics}
            history.append(row)
            tqdm.write(json.dumps(row))
            snap = out / f"step_{step:06d}"
            policy.transformer.save_pretrained(snap / "transformer")
            for name in ("scheduler", "text_encoder", "tokenizer", "model_index.json"):
                src = init / name
                if src.is_dir():
                    import shutil

                    shutil.copytree(src, snap / name, dirs_exist_ok=True)
                else:
                    (snap / name).write_bytes(src.read_bytes())
            (snap / "README.md").write_text(model_card(
                row, {**settings, "eval_prompts": len(heldout[:eval_prompts]), "eval_steps": eval_steps}))
    (out / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    return history


def ship_snapshot(src: Path, dest: Path, image_size: int = 32, seed: int = 0, eval_prompts: int = 128,
                  eval_steps: int = 10, prompt_dir: Path | None = None, world_name: str = "shapes",
                  layout: str = "grid") -> dict:
    """Copy a snapshot to ``dest`` with the transformer in fp16 (half the bytes; the adapter loads it
    back in fp32 on CPU), re-score the copy on the held-out prompts, and rewrite its model card."""
    import shutil

    from diffusers import SD3Transformer2DModel

    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("samples.png", "README.md", "transformer"))
    SD3Transformer2DModel.from_pretrained(src / "transformer", torch_dtype=torch.float16).save_pretrained(dest / "transformer")
    toy = make_world(world_name, prompt_dir, seed, image_size, layout)
    heldout = toy.eval_prompts[:eval_prompts]
    policy = SD3Policy(str(dest), finetune="full", needs_reference=False, max_sequence_length=0,
                       height=image_size, width=image_size, device="cpu")
    reward = RewardEnsemble(toy.rewards)
    sampler = FlowSDESampler(noise_level=0.0, num_steps=eval_steps, guidance_scale=1.0)
    metrics = evaluate(policy, sampler, [reward], heldout, World(0, 1, 0, 1, torch.device("cpu")), seed, 64,
                       image_size, image_size, grid_path=dest / "samples.png")
    history = json.loads((src.parent / "history.json").read_text()) if (src.parent / "history.json").exists() else []
    made = next((h for h in history if f"step_{h['step']:06d}" == src.name), {"step": src.name, "time_s": float("nan")})
    settings = json.loads((src.parent / "settings.json").read_text())
    row = {**metrics, "step": made["step"], "time_s": made["time_s"]}
    (dest / "README.md").write_text(model_card(row, {**settings, "eval_prompts": len(heldout), "eval_steps": eval_steps}))
    return row


def model_card(row: dict, settings: dict) -> str:
    """The model card of one snapshot: what it is, how it was made, how well it does."""
    if settings.get("world") == "digits":
        return _digits_card(row, settings)
    if settings.get("world") == "text":
        return _text_card(row, settings)
    comps = ", ".join(f"{k.rsplit('/', 1)[-1]} {v:.3f}" for k, v in row.items()
                      if k.startswith("eval/shapes_total/") and not k.endswith(("/total", "/correct")))
    cmd = (f"python -m launch.pretrain_toy steps={settings['steps']} batch={settings['batch']} lr={settings['lr']} "
           f"layout={settings['layout']} t_sampling={settings['t_sampling']}")
    origin = ""
    if settings.get("init_from"):
        cmd += f" init_from=<snapshot> decay={str(settings.get('decay', False)).lower()}"
        origin = f" continued from {settings['init_from']}"
    return f"""# steerflow toy: shapes{settings['image_size']} (SD3 family, pixel space)

A tiny text-to-image model of the Stable Diffusion 3 family, shipped with steerflow so that the real
training path runs end to end on a CPU. It is an ordinary diffusers folder: `model_index.json`,
`transformer/` (SD3Transformer2DModel, 4 joint blocks, 4 heads x 32, patch 4, 3 input channels:
RGB pixels in [-1, 1], no VAE), `text_encoder/` (CLIPTextModelWithProjection, 2 layers, width 64,
random and frozen), `tokenizer/` (word-level, CLIP's special tokens), `scheduler/` (flow matching, shift 1).

## How it was made
`{cmd}`
(this snapshot: step {row['step']};{origin}), seed {settings['seed']}, on one CPU thread ({row['time_s']:.0f} s); the transformer
was then stored in fp16 (`python -m launch.pretrain_toy ship_from=<snapshot>`), and the scores below are the stored model's.
Rectified-flow loss (`trainer/flow_matching.py`), {settings['t_sampling']} times, AdamW, 200-step warm-up,
{settings['cond_dropout']:.0%} empty captions (so classifier-free guidance works). Data: scenes of the shapes world
(`models/toy/shapes.py`, {settings['layout']} layout) rendered on the fly for the training prompts
(`models/toy/prompts/shapes_train.txt`); the held-out prompts (`shapes_heldout.txt`) were never trained on.

## Held-out scores
{settings['eval_prompts']} held-out prompts, one sample each, {settings['eval_steps']}-step Euler ODE, guidance {settings['guidance_scale']}, scored by
`rewards/shapes.py` (weight-free scene parser):
- strict accuracy (GenEval-style `correct`): {row['eval/shapes']:.3f}
- mean component score (`total`): {row['eval/shapes_total']:.3f} ({comps})

It is deliberately imperfect, so that RL has room to improve it.
"""


def _digits_card(row: dict, settings: dict) -> str:
    size = settings["image_size"]
    return f"""# steerflow toy: digits{size} (SD3 family, pixel space)

A tiny text-to-image model of the Stable Diffusion 3 family, shipped with steerflow so that the real
training path runs end to end on a CPU: an ordinary diffusers folder (`transformer/`:
SD3Transformer2DModel, 4 joint blocks, 4 heads x 32, patch 2, RGB pixels in [-1, 1], no VAE;
`text_encoder/`: CLIPTextModelWithProjection, 2 layers, width 64, random and frozen; `tokenizer/`:
word-level; `scheduler/`: flow matching, shift 1). Prompts are "the digit zero" .. "the digit nine".

## How it was made
`python -m launch.pretrain_toy world=digits image_size={size} steps={settings['steps']} batch={settings['batch']} lr={settings['lr']} warmup={settings.get('warmup', 200)}`
(this snapshot: step {row['step']}), seed {settings['seed']}, {row['time_s']:.0f} s on this project's 2-core CPU machine;
the transformer was then stored in fp16 (`ship_from=<snapshot>`); the scores below are the stored model's.
Rectified-flow loss (`trainer/flow_matching.py`), {settings['t_sampling']} times, AdamW, {settings.get('warmup', 200)}-step warm-up,
{settings['cond_dropout']:.0%} empty captions. Data: the train split of scikit-learn's bundled handwritten digits
(`models/toy/digits.py`), 8x8 upsampled to {size}x{size} (nearest neighbour).

## Scores
{settings['eval_prompts']} prompts (each digit {settings['eval_prompts'] // 10} times, a fixed evaluation noise stream), {settings['eval_steps']}-step Euler ODE,
scored by `rewards/digits.py` (a logistic-regression classifier fit on the same train split at start-up):
- accuracy (the digit asked for is the classifier's top class): {row['eval/digits']:.3f}
- mean probability of the digit asked for: {row['eval/digits_prob']:.3f}

It is deliberately imperfect, so that RL has room to improve it.
"""


def _text_card(row: dict, settings: dict) -> str:
    size = settings["image_size"]
    return f"""# steerflow toy: text{size} (SD3 family, pixel space)

A tiny text-to-image model of the Stable Diffusion 3 family that draws a word on a sign, shipped with
steerflow so that a text-rendering (OCR) reward drives a real job on a CPU: an ordinary diffusers folder
(`transformer/`: SD3Transformer2DModel, 4 joint blocks, 4 heads x 32, patch 4, RGB pixels in [-1, 1], no
VAE; `text_encoder/`: CLIPTextModelWithProjection, 2 layers, width 64, random and frozen; `tokenizer/`:
word-level; `scheduler/`: flow matching, shift 1). Prompts are 'a sign that says "cat"' for twelve words.

## How it was made
`python -m launch.pretrain_toy world=text image_size={size} steps={settings['steps']} batch={settings['batch']} lr={settings['lr']} warmup={settings.get('warmup', 200)}`
(this snapshot: step {row['step']}), seed {settings['seed']}, {row['time_s']:.0f} s on one thread of this project's 2-core CPU
machine; the transformer was then stored in fp16 (`ship_from=<snapshot>`); the scores
below are the stored model's. Rectified-flow loss, {settings['t_sampling']} times, AdamW,
{settings['cond_dropout']:.0%} empty captions. Data: the word rendered with Pillow's bundled font
(`models/toy/text.py`: 14 px, centred, dark ink on a light background). The snapshot is chosen to
read words often but not always, so that a text-rendering reward has something to teach: later
snapshots of the same run read almost every word.

## Scores
{settings['eval_prompts']} prompts (each word {settings['eval_prompts'] // 12} times, a fixed evaluation noise stream),
{settings['eval_steps']}-step Euler ODE, read back by `rewards/ocr.py` (RapidOCR):
- edit similarity to the word asked for: {row['eval/ocr']:.3f}
- exactly the word: {row['eval/ocr/exact']:.3f}
"""
