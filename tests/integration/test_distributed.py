"""The same job as 1 process and as 2 processes (gloo on CPU), through torchrun and deepspeed."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from jobs import Torchrun, free_port, step_rows, train

DEEPSPEED = Path(sys.executable).parent / "deepspeed"
TORCHRUN = Torchrun(2)


def test_two_processes_match_one(tmp_path):
    """Groups span the two ranks (4 prompts x 4 samples = 16 samples, 8 per rank): the samples,
    rewards, advantages and first-step loss equal the single-process run, and the ratio is exactly 1."""
    one = train(tmp_path / "one", "train.steps=1")
    two = train(tmp_path / "two", "train.steps=1", launcher=TORCHRUN)
    s1, s2 = step_rows(one)[0], step_rows(two)[0]
    assert s2["train/onpolicy_log_ratio_max"] == 0.0
    for key in ("reward/total", "reward/shapes/count", "reward/shapes/color"):
        assert s1[key] == s2[key], key  # bitwise: same noise per (step, prompt id, sample index)
    for key in ("train/loss", "train/pg_loss", "train/kl", "train/clip_frac"):
        assert s2[key] == pytest.approx(s1[key], rel=1e-6, abs=1e-9), key
    e1 = json.loads((tmp_path / "one" / "summary.json").read_text())["eval_before"]
    e2 = json.loads((tmp_path / "two" / "summary.json").read_text())["eval_before"]
    assert e1 == e2


@pytest.mark.skipif(not DEEPSPEED.exists(), reason="the deepspeed launcher is not installed beside this python")
def test_deepspeed_launcher_runs_the_same_job(tmp_path):
    launcher = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py"]
    rows = step_rows(train(tmp_path, "train.steps=1", launcher=launcher))
    assert rows[0]["train/onpolicy_log_ratio_max"] == 0.0
    assert (tmp_path / "checkpoints" / "step_000001" / "policy.safetensors").is_file()
