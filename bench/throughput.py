"""Throughput of the training loop: ``python bench/throughput.py [overrides]`` prints one JSON line.

Runs a few GRPO iterations of the composed config (default: the embedded toy) and reports images/s
for rollout, for training and overall (first iteration excluded as warm-up), the share of step wall
time spent inside the policy's forward and backward passes, and peak memory. Numbers, not tests.
"""
from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from trainer.config import register

ROOT = Path(__file__).resolve().parents[1]


class _PolicyTimer:
    """Wall time inside the top-level transformer forward and inside engine.backward."""

    def __init__(self):
        self.forward = 0.0
        self.backward = 0.0
        self._t = None
        self._depth = 0

    def install(self):
        import deepspeed.runtime.engine as ds_engine
        from diffusers import SD3Transformer2DModel

        timer = self

        def pre(module, args, kwargs=None):
            if isinstance(module, SD3Transformer2DModel):
                if timer._depth == 0:
                    timer._t = time.perf_counter()
                timer._depth += 1

        def post(module, args, out, kwargs=None):
            if isinstance(module, SD3Transformer2DModel):
                timer._depth -= 1
                if timer._depth == 0:
                    timer.forward += time.perf_counter() - timer._t

        torch.nn.modules.module.register_module_forward_pre_hook(pre)
        torch.nn.modules.module.register_module_forward_hook(post)
        original = ds_engine.DeepSpeedEngine.backward

        def backward(engine, *a, **k):
            t = time.perf_counter()
            try:
                return original(engine, *a, **k)
            finally:
                timer.backward += time.perf_counter() - t

        ds_engine.DeepSpeedEngine.backward = backward


def main(overrides: list[str]) -> dict:
    register()
    timer = _PolicyTimer()
    timer.install()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        dcfg = compose("train", overrides=["train.steps=4", "logger=none", "train.progress=false", "data.eval_size=8", *overrides])
    from trainer.distributed import init_distributed, set_threads
    from trainer.loop import train

    cfg = OmegaConf.to_object(dcfg)
    world = init_distributed(cfg.train.device, cfg.deepspeed.backend)
    threads = set_threads(cfg.train.num_threads, world)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        t0 = time.time()
        summary = train(cfg, world, run_dir, OmegaConf.to_yaml(dcfg, resolve=True))
        total = time.time() - t0
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "time/step" in r][1:]  # first iteration is warm-up
    n_images = cfg.data.prompts_per_step * cfg.algorithm.group_size
    step_time = sum(r["time/step"] for r in steps)
    result = {
        "bench": "throughput",
        "config": " ".join(overrides) or f"default ({cfg.exp_name})",
        "device": str(world.device),
        "threads": threads,
        "world_size": world.world_size,
        "images_per_iteration": n_images,
        "iterations_timed": len(steps),
        "rollout_images_per_s": round(n_images * len(steps) / sum(r["time/rollout"] for r in steps), 2),
        "train_images_per_s": round(n_images * len(steps) / sum(r["time/train"] for r in steps), 2),
        "overall_images_per_s": round(n_images * len(steps) / step_time, 2),
        "s_per_iteration": round(step_time / len(steps), 3),
        # Over the whole run (evaluations included), the share of time in the policy network.
        "policy_forward_share": round(timer.forward / total, 3),
        "policy_backward_share": round(timer.backward / total, 3),
        "peak_memory_mb": round(
            torch.cuda.max_memory_allocated() / 2**20 if world.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
        ),
        "wall_s": round(total, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
