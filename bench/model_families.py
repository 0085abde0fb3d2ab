"""Rollout and training throughput per model family, on tiny models of each family on this machine.

    python bench/model_families.py [--images 8] [--steps 8] [--repeats 3] [--threads 1] [--families flux_1_dev ...]

For each family in FAMILIES: save its tiny random diffusers folder (or use the shipped toy), build the
policy from the family's model config the way the trainer does (``model=<config> model.path=<folder>``
plus toy-size knobs), then time (best of --repeats, round-robin over families after a warm-up round):
  rollout_images_per_s  trainer.rollout.rollout_chunks of --images samples (videos for video families) with
                        the family's stochastic sampler (Flow-GRPO's SDE; DDIM eta 1 for UNets), sampler.num_steps
                        steps, all stochastic, the family's guidance, decode included
  train_images_per_s    the training pass on those samples: every stochastic step's log-prob recomputed
                        with gradients and backpropagated, then one AdamW step (no DeepSpeed)
  transformer_calls_per_step  transformer calls per denoising step (2 with true CFG run as two calls, as
                        QwenImagePipeline does; SD3 batches its CFG pair into one call)
Prints one JSON line per family. Numbers, not assertions; --threads sets torch's threads (default 1).

Adding a family: one FAMILIES entry (its model config, a builder that writes a tiny diffusers folder or
None for a shipped one, and its knobs at toy size).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tiny builders (tests/tiny_families.py, tests/conftest.py)

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from samplers.flow_sde import FlowSDESampler
from trainer.config import register
from trainer.rollout import rollout_chunks

PROMPTS = ["a red circle", "two blue squares on the left", "a green triangle above a yellow star", "three purple dots"]


@dataclass
class Family:
    """model_config: conf/model/<name>; build(folder): writes a tiny diffusers folder (None: the config's own
    path); knobs: overrides at toy size; guidance_scale: the sampler's, as the family is used."""

    model_config: str
    build: Callable | None
    knobs: list[str] = field(default_factory=list)
    guidance_scale: float = 1.0
    # The family's stochastic sampler, built for a number of steps: velocity families use Flow-GRPO's SDE,
    # epsilon (UNet) families DDIM at eta 1.
    sampler: Callable = lambda steps: FlowSDESampler(noise_level=0.7, num_steps=steps)


def _tiny_sd3(folder):
    from conftest import build_tiny_sd3_pipeline

    build_tiny_sd3_pipeline().save_pretrained(folder)


def _tiny(builder_name: str):
    def build(folder):
        import tiny_families

        getattr(tiny_families, builder_name)().save_pretrained(folder)

    return build


def _tiny_unet(builder_name: str):
    def build(folder):
        import tiny_unet_pipelines

        getattr(tiny_unet_pipelines, builder_name)().save_pretrained(folder)

    return build


def _tiny_wan(folder):
    sys.path.insert(0, str(ROOT / "tests" / "unit" / "models"))
    from test_wan import build_tiny_wan

    build_tiny_wan().save_pretrained(folder)


def _ddim(steps: int):
    from samplers.ddim import DDIMSampler

    return DDIMSampler(noise_level=1.0, num_steps=steps)


FAMILIES = {
    # The shipped shapes toy: pixel-space SD3 transformer (4 blocks), 32 px, no CFG.
    "sd3_toy": Family("toy_shapes", None, [], 1.0),
    # Random SD3 (2 blocks, CLIP x2 + T5, 16-ch VAE) at 16 px, CFG 4.5 (two forwards per step, batched).
    "sd3_tiny": Family("sd3_5_medium", _tiny_sd3, ["model.max_sequence_length=16", "model.height=16", "model.width=16"], 4.5),
    # Random FLUX.1-dev (1 + 1 blocks), 16 px, distilled guidance 3.5 (one forward per step).
    "flux_1_dev": Family("flux_1_dev", _tiny("build_tiny_flux"),
                         ["model.max_sequence_length=16", "model.height=16", "model.width=16"], 3.5),
    # Random Qwen-Image (1 block, Qwen2.5-VL text encoder), 16 px, true CFG 4 (two forwards per step).
    "qwen_image": Family("qwen_image", _tiny("build_tiny_qwen_image"),
                         ["model.max_sequence_length=64", "model.height=16", "model.width=16"], 4.0),
    # Random SD1.5 / SDXL UNets at 16 px, CFG 5 batched into one call, DDIM at eta 1 (DDPO's sampler).
    "sd1_5": Family("sd1_5", _tiny_unet("build_tiny_sd15"), ["model.height=16", "model.width=16"], 5.0, _ddim),
    "sdxl": Family("sdxl", _tiny_unet("build_tiny_sdxl"), ["model.height=16", "model.width=16"], 5.0, _ddim),
    # Random Wan 2.1 (2 blocks, video VAE, UMT5): 9 frames of 32x32, CFG 5 (images/s here: videos/s).
    "wan2_1": Family("wan2_1_t2v", _tiny_wan, ["model.num_frames=9", "model.height=32", "model.width=32",
                                                "model.max_sequence_length=16"], 5.0),
    # The shipped video toy: pixel-space Wan, 4 frames of 20x20, no CFG.
    "wan_toy_video": Family("toy_video", None, [], 1.0),
}


def build_policy(family: Family, folder: Path):
    overrides = ["logger=none", f"model={family.model_config}", "model.gradient_checkpointing=false", "model.dtype=float32",
                 *family.knobs]
    if family.build is not None:
        family.build(folder)
        overrides.append(f"model.path={folder}")
    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=overrides))
    torch.manual_seed(0)
    return instantiate(cfg.model, device="cpu", needs_reference=False)


class ForwardCounter:
    """Counts transformer forwards (a forward pre-hook)."""

    def __init__(self, module):
        self.n = 0
        module.register_forward_pre_hook(lambda *_: setattr(self, "n", self.n + 1))


def train_pass(policy, sampler, chunks, guidance_scale, optimizer) -> float:
    """Seconds to recompute every stochastic step's log-prob with gradients, backpropagate and step."""
    t = time.perf_counter()
    for traj in chunks:
        cond = policy.encode([PROMPTS[int(p)] for p in traj.prompt_ids])
        for j in traj.stochastic[0].nonzero().flatten().tolist():
            log_prob, _, _ = sampler.log_prob(lambda x, s, c: policy.predict(x, s, c, guidance_scale), traj, j, cond)
            (-log_prob.mean()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def main(argv: list[str]) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the CI setting)")
    args = parser.parse_args(argv)
    pids, sids = torch.arange(args.images) % len(PROMPTS), torch.arange(args.images) // len(PROMPTS)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for name in args.families:
            policy = build_policy(FAMILIES[name], Path(tmp) / name)
            params = [p for p in policy.transformer.parameters() if p.requires_grad]
            runs[name] = (policy, torch.optim.AdamW(params, lr=1e-4), ForwardCounter(policy.transformer))
        # Set after the builds: importing the test fixtures (tests/conftest.py) pins torch to 1 thread.
        torch.set_num_threads(args.threads)
        best: dict[str, tuple[float, float, float]] = {}
        # Round-robin, best of --repeats: load from other processes slows every family alike.
        for rep in range(args.repeats + 1):  # round 0 warms up (allocations, the text-embedding cache)
            for name, (policy, optimizer, counter) in runs.items():
                g = FAMILIES[name].guidance_scale
                sampler = FAMILIES[name].sampler(args.steps)
                counter.n = 0
                t = time.perf_counter()
                with torch.no_grad():
                    chunks, _ = rollout_chunks(policy, sampler, PROMPTS, pids, sids, (0, 1, rep), args.steps, g,
                                               args.micro_batch, policy.height, policy.width)
                rollout_s = time.perf_counter() - t
                per_step = counter.n / (len(chunks) * args.steps)
                train_s = train_pass(policy, sampler, chunks, g, optimizer)
                if rep and (name not in best or rollout_s + train_s < sum(best[name][:2])):
                    best[name] = (rollout_s, train_s, per_step)
    rows = []
    for name, (rollout_s, train_s, per_step) in best.items():
        policy = runs[name][0]
        row = {
            "family": name, "model": FAMILIES[name].model_config, "size": policy.height, "images": args.images,
            "threads": args.threads,
            "steps": args.steps, "guidance_scale": FAMILIES[name].guidance_scale, "transformer_calls_per_step": per_step,
            "transformer_params": sum(p.numel() for p in policy.transformer.parameters()),
            "trainable_params": sum(p.numel() for p in policy.transformer.parameters() if p.requires_grad),
            "rollout_images_per_s": round(args.images / rollout_s, 2),
            "train_images_per_s": round(args.images / train_s, 2),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
