"""Stable run directories: derived from the experiment name and the overrides that change results."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

# Override prefixes that do not change results (where things go, how they are shown, how many
# threads): relaunching with a different value of these finds the same run.
INFRA_PREFIXES = (
    "run_dir", "logger", "train.progress", "train.num_threads", "train.device", "hydra", "exp_name", "train.resume",
    "train.save_every", "train.keep_last", "train.max_consecutive_skips", "train.requeue", "train.grid_every",
    "train.overlap_rewards", "data.max_prompt_chars",
)


def result_overrides(overrides: list[str]) -> list[str]:
    keep = []
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if not key.startswith(INFRA_PREFIXES):
            keep.append(o)
    return sorted(keep)


def default_run_dir(exp_name: str, overrides: list[str], root: str | Path = "runs") -> Path:
    """``runs/<exp_name>-<8 hex of the result-changing overrides>`` (no clock: same command, same run)."""
    digest = hashlib.sha256("\n".join(result_overrides(overrides)).encode()).hexdigest()[:8]
    return Path(root) / f"{exp_name}-{digest}"


def run_dir_problems(run_dir: Path, key: str = "run_dir") -> list[str]:
    """Why ``run_dir`` cannot hold a run (a file, or a folder this process cannot write); [] if it can.

    A folder that does not exist yet is judged by its nearest existing parent, where it will be made.
    """
    path = Path(run_dir).expanduser().absolute()
    if path.exists() and not path.is_dir():
        return [f"{key}={str(run_dir)!r} is a file: give a folder (it is made if missing)"]
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        where = "it" if probe == path else f"its parent {probe}"
        return [f"{key}={str(run_dir)!r}: {where} is not writable (read-only file system or permissions): choose a "
                "writable folder with run_dir=..."]
    return []
