"""Reward throughput: ``python bench/rewards.py [--size 64] [--batch 32] [--batches 5] [names...]``.

Builds every ``conf/reward/*.yaml`` (or the named ones) as `RewardEnsemble` does (weight popped,
``hydra.utils.instantiate`` on the rest) and prints one JSON line per reward: images/s over all
batches but the first (warm-up: lazy model loading, allocator). One thread for torch, OpenCV and
(through the configs) onnxruntime, as in training on a shared CPU. Images are words rendered with
Pillow's bundled font, so OCR does real detection and recognition work; prompts are in each
reward's grammar. Numbers, not tests.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image, ImageDraw, ImageFont

WORDS = ("hello", "steer", "flow", "cat", "reward", "sign", "42", "open")


def prompts_for(target: str, n: int) -> list[str]:
    """n prompts that the reward `target` can parse (its own grammar, or anything)."""
    if target == "rewards.digits.DigitReward":
        from models.toy.digits import caption

        return [caption(i % 10) for i in range(n)]
    if target == "rewards.shapes.ShapesReward":
        return [("a red circle", "two blue squares")[i % 2] for i in range(n)]
    if target == "rewards.ocr.OcrReward":
        return [f'a sign that says "{WORDS[i % len(WORDS)]}"' for i in range(n)]
    return [f"a photo of {WORDS[i % len(WORDS)]}" for i in range(n)]


def render_words(n: int, size: int) -> torch.Tensor:
    """[n, 3, size, size] float in [0, 1]: WORDS in black on white, centred, a quarter of the height tall."""
    font = ImageFont.load_default(size=max(8, size // 4))
    out = []
    for i in range(n):
        image = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(image)
        text = WORDS[i % len(WORDS)]
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        draw.text(((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top), text, fill="black", font=font)
        out.append(np.asarray(image))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


def bench(path: Path, images: torch.Tensor, batches: int) -> dict:
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    spec.pop("weight", None)  # the ensemble's, not the constructor's
    t0 = time.perf_counter()
    reward = instantiate(spec)
    build_s = time.perf_counter() - t0
    prompts = prompts_for(spec["_target_"], len(images))
    metadata = [{"prompt_id": i // 8} for i in range(len(images))]  # groups of 8, for win rates
    if getattr(reward, "input_kind", "pixels") == "video":  # 4-frame clips of the same word images
        images = images.unsqueeze(1).repeat(1, 4, 1, 1, 1)
    times = []
    for _ in range(batches):
        t0 = time.perf_counter()
        reward(images, prompts, metadata)
        times.append(time.perf_counter() - t0)
    timed = times[1:]  # the first batch is warm-up
    per_image = sum(timed) / (len(timed) * len(images))
    return {
        "reward": path.stem,
        "target": spec["_target_"],
        "images_per_s": round(1 / per_image, 1),
        "ms_per_image": round(per_image * 1000, 3),
        "first_batch_s": round(times[0], 3),
        "build_s": round(build_s, 3),
        "batch": len(images),
        "timed_batches": len(timed),
        "size": images.shape[-1],
        "frames": images.shape[1] if images.ndim == 5 else 1,  # video rewards: images_per_s counts clips
    }


def main(argv: list[str]) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="conf/reward file stems (default: all)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=32, help="images per batch")
    parser.add_argument("--batches", type=int, default=5, help="batches per reward, the first excluded (>= 2)")
    args = parser.parse_args(argv)
    if args.batches < 2:
        parser.error(f"--batches must be >= 2 (the first is warm-up), got {args.batches}")
    torch.set_num_threads(1)
    import cv2  # the shapes reward's connected components; its own thread pool otherwise

    cv2.setNumThreads(1)
    paths = sorted((ROOT / "conf" / "reward").glob("*.yaml"))
    if args.names:
        unknown = sorted(set(args.names) - {p.stem for p in paths})
        if unknown:
            parser.error(f"no conf/reward/<name>.yaml for {unknown}; have {[p.stem for p in paths]}")
        paths = [p for p in paths if p.stem in args.names]
    images = render_words(args.batch, args.size)
    results = []
    for path in paths:
        target = str(OmegaConf.load(path).get("_target_", ""))
        if target.endswith(("RemoteReward", "OpenAIJudge")):
            # A server's throughput is the server's reward plus the protocol: bench/reward_server.py.
            results.append({"reward": path.stem, "skipped": "needs a running server (bench/reward_server.py measures it)"})
            print(json.dumps(results[-1]), flush=True)
            continue
        try:
            results.append(bench(path, images, args.batches))
        except Exception as e:  # noqa: BLE001 - Hydra wraps the constructor's error; look at its causes
            cause = e
            while cause is not None and not isinstance(cause, (FileNotFoundError, ConnectionError, OSError)):
                cause = cause.__cause__
            if cause is None:
                raise
            # Learned rewards need local weights, remote ones a server: measured only where they exist.
            results.append({"reward": path.stem, "skipped": f"{type(cause).__name__}: {str(cause).splitlines()[0][:160]}"})
        print(json.dumps(results[-1]), flush=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
