"""Rollout cost per sampler configuration and the saving from training only a window of steps.

    python bench/samplers.py [--images 32] [--repeats 3] [overrides of the composed job ...]

Builds the policy of the composed job (default: the embedded toy, ``experiment=toy_digits``), then for
each sampler configuration below times ``rollout_chunks`` on ``--images`` samples (best of
``--repeats``, round-robin, after a warm-up round) and the training pass the trainer runs on them: for every trained step
of every chunk, recompute the log-prob with gradients and backpropagate (no optimizer step, no
DeepSpeed: the part that depends on the sampler). Prints one JSON line per configuration:

  images_per_s       rollout throughput
  model_share        share of rollout wall time inside policy.predict (the rest: sampler arithmetic,
                     noise draws, log-probs, guidance gradients, decoding)
  stochastic_steps   steps that draw noise (and are trained, all of them: timestep_fraction 1)
  train_s            the training pass on those samples (null for the deterministic samplers)
  train_saving       1 - train_s / train_s of the all-steps flow_sde configuration
  iteration_saving   the same for rollout + training

Numbers, not assertions (timings vary with the machine and its load); run with OMP_NUM_THREADS set.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from samplers.cps import CPSSampler
from samplers.dance_sde import DanceSDESampler
from samplers.flow_sde import FlowSDESampler
from samplers.guidance import LatentTarget
from samplers.ode import ODESampler
from trainer.config import register
from trainer.rollout import rollout_chunks

ROOT = Path(__file__).resolve().parents[1]


def configurations(num_steps: int) -> dict:
    """name -> a sampler; the first is the baseline the savings are measured against."""
    k = dict(num_steps=num_steps, eval_num_steps=num_steps, guidance_scale=1.0)
    half = num_steps // 2
    return {
        "flow_sde all steps": FlowSDESampler(noise_level=0.7, **k),
        "flow_sde window 2": FlowSDESampler(noise_level=0.7, window_start=1, window_size=2, **k),
        f"flow_sde window {half}": FlowSDESampler(noise_level=0.7, window_size=half, **k),
        "flow_sde sliding 2 + dpm2": FlowSDESampler(noise_level=0.7, window="sliding", window_size=2, window_every=1,
                                                    ode_solver="dpm2", **k),
        "dance_sde all steps": DanceSDESampler(noise_level=0.3, **k),
        "cps all steps": CPSSampler(noise_level=0.5, **k),
        "flow_sde all + reward guidance": FlowSDESampler(noise_level=0.7, reward_guidance=LatentTarget(1.0),
                                                         reward_guidance_scale=100.0, **k),
        "ode euler": ODESampler(**k),
        "ode dpm2": ODESampler(ode_solver="dpm2", **k),
    }


class PredictTimer:
    """Wall time inside policy.predict."""

    def __init__(self, policy):
        self.seconds, self._predict = 0.0, policy.predict

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return self._predict(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t

        policy.predict = timed


def train_pass(policy, sampler, chunks, prompts) -> float:
    """Seconds to recompute every stochastic step's log-prob with gradients and backpropagate it."""
    params = [p for p in policy.transformer.parameters() if p.requires_grad]
    t = time.perf_counter()
    for traj in chunks:
        cond = policy.encode([prompts[int(p)] for p in traj.prompt_ids])
        for j in traj.stochastic[0].nonzero().flatten().tolist():
            log_prob, _, _ = sampler.log_prob(lambda x, s, c: policy.predict(x, s, c, 1.0), traj, j, cond)
            (-log_prob.mean()).backward()
    for p in params:
        p.grad = None
    return time.perf_counter() - t


def main(argv: list[str]) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args, overrides = parser.parse_known_args(argv)
    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=["logger=none", *overrides]))
    torch.manual_seed(cfg.seed)
    policy = instantiate(cfg.model, device="cpu", needs_reference=False)
    timer = PredictTimer(policy)
    prompts = [line for line in Path(cfg.data.prompts).read_text().splitlines() if line.strip()]
    pids = torch.arange(args.images) % len(prompts)
    sids = torch.arange(args.images) // len(prompts)
    steps = cfg.sampler.num_steps
    configs = configurations(steps)
    best: dict[str, tuple] = {}
    # Round-robin over the configurations, best of --repeats each: load from other processes then
    # slows every configuration alike instead of whichever happened to run during it.
    for rep in range(args.repeats + 1):  # round 0 warms up (allocations, prompt cache)
        for name, sampler in configs.items():
            timer.seconds = 0.0
            t = time.perf_counter()
            chunks, _ = rollout_chunks(policy, sampler, prompts, pids, sids, (cfg.seed, 1, rep), steps, 1.0,
                                       cfg.train.micro_batch, policy.height, policy.width, iteration=rep)
            rollout_s = time.perf_counter() - t
            model_s = timer.seconds
            n_stochastic = int(chunks[0].stochastic[0].sum())
            train_s = train_pass(policy, sampler, chunks, prompts) if n_stochastic else 0.0
            if rep and (name not in best or rollout_s + train_s < best[name][0] + best[name][2]):
                best[name] = (rollout_s, model_s, train_s, n_stochastic)
    rows = []
    base = best[next(iter(configs))]
    for name, (rollout_s, model_s, train_s, n_stochastic) in best.items():
        row = {
            "sampler": name, "images": args.images, "steps": steps, "stochastic_steps": n_stochastic,
            "images_per_s": round(args.images / rollout_s, 2), "model_share": round(model_s / rollout_s, 3),
            "rollout_s": round(rollout_s, 3),
            # Deterministic samplers have nothing to train: no training cost to compare.
            "train_s": round(train_s, 3) if n_stochastic else None,
            "train_saving": round(1 - train_s / base[2], 3) if n_stochastic else None,
            "iteration_saving": round(1 - (rollout_s + train_s) / (base[0] + base[2]), 3) if n_stochastic else None,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
