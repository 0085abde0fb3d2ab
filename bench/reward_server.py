"""Reward throughput local vs through the reward server:
``python bench/reward_server.py [--size 64] [--batch 32] [--batches 6] [names...]`` (default: brightness
jpeg_compressibility).

For each conf/reward/<name>.yaml, prints one JSON line per mode, images/s over all batches but the first
(warm-up):
  local       the reward called in this process, as RewardEnsemble calls it;
  raw, png    RemoteReward against ``python -m launch.serve_reward reward=<name> port=0`` in a
              subprocess (loopback), new images every batch so the dedup cache never answers;
  raw-cached  the same raw batch sent again: what the dedup cache answers at.
One torch thread on each side, as the server defaults to. Numbers, not tests.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from rewards.remote import RemoteReward


def smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """[n, 3, size, size] in [0, 1]: low-frequency colour fields plus mild noise (compresses like a photo-ish image)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, max(2, size // 8), max(2, size // 8), generator=g)
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (fine + 0.03 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


def timed(score, batches: list[torch.Tensor], prompts: list[str]) -> float:
    """images/s over all batches but the first."""
    times = []
    for images in batches:
        t0 = time.perf_counter()
        score(images, prompts)
        times.append(time.perf_counter() - t0)
    return sum(len(b) for b in batches[1:]) / sum(times[1:])


def start_server(name: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("STEERFLOW_REWARD_TOKEN", None)
    process = subprocess.Popen([sys.executable, "-m", "launch.serve_reward", f"reward={name}", "port=0"], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = process.stdout.readline()
    if " at http" not in first:
        process.kill()
        raise RuntimeError(f"the server did not start: {first}{process.stdout.read()}")
    return process, first.rsplit(" at ", 1)[1].strip()


def main(argv: list[str]) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=["brightness", "jpeg_compressibility"], help="conf/reward file stems")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=32, help="images per batch (and per request)")
    parser.add_argument("--batches", type=int, default=6, help="batches per mode, the first excluded (>= 2)")
    args = parser.parse_args(argv)
    if args.batches < 2:
        parser.error(f"--batches must be >= 2 (the first is warm-up), got {args.batches}")
    torch.set_num_threads(1)
    batches = [smooth_images(args.batch, args.size, seed) for seed in range(args.batches)]
    prompts = ["a photo"] * args.batch
    results = []
    for name in args.names:
        spec = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "reward" / f"{name}.yaml"), resolve=True)
        spec.pop("weight", None)
        spec.pop("role", None)
        rates = {"local": timed(instantiate(spec), batches, prompts)}
        process, url = start_server(name)
        try:
            for fmt in ("raw", "png"):
                # Fresh images per format, so the cache cannot answer the second format's batches.
                fresh = [smooth_images(args.batch, args.size, 1000 * (fmt == "png") + 100 + i) for i in range(args.batches)]
                rates[fmt] = timed(RemoteReward(url, image_format=fmt, retries=0, batch_size=args.batch), fresh, prompts)
            remote = RemoteReward(url, retries=0, batch_size=args.batch)
            rates["raw-cached"] = timed(remote, [batches[0]] * args.batches, prompts)
        finally:
            process.terminate()
            process.communicate(timeout=10)
        for mode, rate in rates.items():
            results.append({"reward": name, "mode": mode, "images_per_s": round(rate, 1),
                            "ms_per_image": round(1000 / rate, 4), "batch": args.batch, "size": args.size,
                            "timed_batches": args.batches - 1})
            print(json.dumps(results[-1]), flush=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
