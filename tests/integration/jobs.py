"""Run the real CLI in a subprocess, the way users launch jobs, and read its outputs."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# A small, fast GRPO job on the shipped shapes toy (about 1 s per step on one thread).
SMALL = [
    "experiment=toy_shapes",
    "data.prompts_per_step=4", "algorithm.group_size=4", "train.micro_batch=8", "data.eval_size=16",
    # eval_batch 8 = the per-rank share with 2 processes: equal chunk shapes give bitwise equal samples.
    "logger=none", "train.progress=false", "train.num_threads=1", "train.eval_batch=8",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Torchrun:
    """``torchrun --nproc_per_node N -m launch.train`` on a port chosen anew each time the command is
    unpacked (``[*TORCHRUN, ...]``): fixed ports collide when two test sessions share a machine."""

    def __init__(self, nproc: int = 2):
        self.nproc = nproc

    def __iter__(self):
        return iter([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(self.nproc),
                     "--master_port", str(free_port()), "-m", "launch.train"])


def job_env(threads: int = 1, **extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline",
           **extra}
    env.pop("RANK", None)
    return env


def run(cmd: list[str], timeout: int = 900, threads: int = 1, env: dict | None = None,
        expect: int = 0) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the repo root; fail with its output unless it exits with ``expect``."""
    proc = subprocess.run(cmd, cwd=ROOT, env=env or job_env(threads), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != expect:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}, expected {expect}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def train(run_dir: Path, *overrides: str, launcher: list[str] | None = None, timeout: int = 900) -> list[dict]:
    """Run a training job into run_dir and return its metrics.jsonl rows."""
    launcher = launcher or [sys.executable, "-m", "launch.train"]
    run([*launcher, f"run_dir={run_dir}", *SMALL, *overrides], timeout=timeout)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "train/loss" in r]
