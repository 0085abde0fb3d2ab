"""Prompt tables and which prompts each step draws."""
from __future__ import annotations

from pathlib import Path

import torch

from trainer.rng import STREAM_PROMPTS, generator


def load_prompts(path: str, key: str = "data.prompts") -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{key}={path!r}: no such file; give a text file with one prompt per line")
    prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{key}={path!r} holds no prompts")
    return prompts


def step_prompt_ids(num_prompts: int, per_step: int, step: int, seed: int) -> torch.Tensor:
    """The ``per_step`` distinct prompt ids of training step ``step`` (a pure function of its arguments).

    Distinct ids within a step keep (step, prompt id, sample index) unique, which the noise seeds rely on.
    """
    if per_step > num_prompts:
        raise ValueError(f"data.prompts_per_step ({per_step}) exceeds the {num_prompts} prompts available")
    return torch.randperm(num_prompts, generator=generator(seed, STREAM_PROMPTS, step))[:per_step]
