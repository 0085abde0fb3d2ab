"""What overlapping rewards with sampling saves: rollout + scoring of one step's samples, scored after
the rollout (train.overlap_rewards=false) or chunk by chunk in the background while the next chunk
samples (the default). Prints one JSON line per reward set.

    python bench/reward_overlap.py                 # the shapes toy, 64 samples in chunks of 16

Reward sets: the toy's local rewards (shapes parser + JPEG: cheap, CPU-bound), OCR (rapidocr, ~50 ms
per image, CPU-bound: on a 2-core machine it competes with sampling for the cores), and the JPEG
reward served by ``launch.serve_reward`` in its own process (HTTP round trips).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra.utils import instantiate  # noqa: E402

from rewards.ensemble import RewardEnsemble, RewardResult  # noqa: E402
from trainer.rollout import rollout_chunks  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time(policy, sampler, ensemble, prompts, n, chunk, overlap: bool, reps: int) -> float:
    pids = torch.arange(n) % len(prompts)
    sids = torch.arange(n) // len(prompts)
    local = [prompts[int(p)] for p in pids]
    best = float("inf")
    for rep in range(reps):
        futures = []
        t = time.perf_counter()
        _, images = rollout_chunks(
            policy, sampler, prompts, pids, sids, (0, 1, rep), sampler.num_steps, 1.0, chunk, policy.height,
            policy.width, on_chunk=(lambda s, im: futures.append(ensemble.submit(im, local[s:s + len(im)]))) if overlap else None,
        )
        if overlap:
            RewardResult.cat([f.result() for f in futures])
        else:
            ensemble(images, local)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> list[dict]:
    from omegaconf import OmegaConf

    from trainer.config import register

    register()
    torch.set_num_threads(1)
    model = OmegaConf.load(ROOT / "conf/model/toy_shapes.yaml")
    model.path = str(ROOT / "models/toy/weights/shapes32")
    policy = instantiate(model, device="cpu", needs_reference=False)
    sampler = instantiate(OmegaConf.create({"_target_": "samplers.flow_sde.FlowSDESampler", "noise_level": 0.7,
                                            "num_steps": 8, "guidance_scale": 1.0}))
    prompts = [line.strip() for line in (ROOT / "models/toy/prompts/shapes_train.txt").read_text().splitlines() if line.strip()][:16]
    words = [f'a sign that says "{w}"' for w in ("cat", "dog", "sun", "red")]
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "launch.serve_reward", "reward=jpeg_compressibility", f"port={port}"],
                              cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sets = {
            "local shapes+jpeg": {"shapes": {"_target_": "rewards.shapes.ShapesReward"},
                                  "jpeg": {"_target_": "rewards.jpeg.JpegCompressibility"}},
            "served jpeg (HTTP)": {"jpeg": {"_target_": "rewards.remote.RemoteReward", "url": f"http://127.0.0.1:{port}"}},
            "local ocr": {"ocr": {"_target_": "rewards.ocr.OcrReward"}},
        }
        time.sleep(3)  # the server's start-up
        out = []
        for name, spec in sets.items():
            ens = RewardEnsemble(spec)
            use = words if "ocr" in name else prompts
            _time(policy, sampler, ens, use, 16, 16, False, 1)  # warm-up (lazy model loads, connections)
            serial = _time(policy, sampler, ens, use, 64, 16, False, 2)
            overlapped = _time(policy, sampler, ens, use, 64, 16, True, 2)
            row = {"rewards": name, "samples": 64, "chunk": 16, "serial_s": round(serial, 3),
                   "overlapped_s": round(overlapped, 3), "saving": f"{100 * (1 - overlapped / serial):.0f}%"}
            print(json.dumps(row), flush=True)
            out.append(row)
        return out
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
