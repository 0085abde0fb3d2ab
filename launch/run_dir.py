"""Stable run directories: derived from the experiment name and the overrides that change results."""
from __future__ import annotations

import hashlib
from pathlib import Path

# Override prefixes that do not change results (where things go, how they are shown, how many
# threads): relaunching with a different value of these finds the same run.
INFRA_PREFIXES = (
    "run_dir", "logger", "train.progress", "train.num_threads", "train.device", "hydra", "exp_name", "train.resume",
    "train.save_every", "train.keep_last", "train.max_consecutive_skips", "train.requeue", "train.grid_every",
    "train.overlap_rewards",
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
