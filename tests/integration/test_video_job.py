"""A GRPO job on the shipped video toy (pixel-space Wan, moving shapes) through the real CLI."""
from __future__ import annotations

import json
import sys

from PIL import Image
from safetensors.torch import load_file

from jobs import run

SMALL_VIDEO = [
    "experiment=toy_video", "logger=none", "train.progress=false", "train.num_threads=1", "train.steps=2",
    "data.prompts_per_step=2", "algorithm.group_size=4", "train.micro_batch=8", "train.eval_batch=8", "train.grid_every=1",
]


def test_video_job_runs_end_to_end(tmp_path):
    """Videos [B, 4, 3, 20, 20] go through rollout, the video rewards, GRPO, monitors, evaluation and
    checkpointing; the sample grids are animated GIFs with one frame per video frame."""
    run([sys.executable, "-m", "launch.train", f"run_dir={tmp_path}", *SMALL_VIDEO], timeout=600)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["train/onpolicy_log_ratio_max"] == 0.0, "recomputed log-prob differs from the rollout's"
        assert {"reward/motion/direction", "reward/motion/displacement", "reward/consistency/min_pair",
                "monitor/diversity"} <= set(r)
        assert 0.0 <= r["reward/consistency"] <= 1.0
    evals = [r for r in rows if "eval/num_prompts" in r]
    assert [r["step"] for r in evals] == [0, 2] and evals[0]["eval/num_prompts"] == 8
    assert {"eval/accuracy", "monitor/drift/brightness"} <= set(evals[0])
    grids = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert grids == ["eval_000000.gif", "eval_000002.gif", "train_000001.gif", "train_000002.gif"]
    with Image.open(tmp_path / "samples" / "train_000001.gif") as gif:
        assert gif.n_frames == 4 and gif.is_animated
    ckpt = tmp_path / "checkpoints" / "step_000002"
    assert all("lora" in k for k in load_file(str(ckpt / "policy.safetensors")))
    assert (tmp_path / "config.yaml").read_text().count("_target_: models.wan.WanPolicy") == 1
