"""Explicit randomness: every random draw derives from a tuple of integers, never from global state.

A sample's noise depends on (seed, step, prompt id, sample index) only, so it is the same on 1 or N
processes and after a resume.
"""
from __future__ import annotations

import torch

_MASK = (1 << 64) - 1

# Stream tags keep unrelated draws independent even when their other integers coincide.
STREAM_ROLLOUT, STREAM_PROMPTS, STREAM_TRAIN, STREAM_EVAL, STREAM_CLEAN = 1, 2, 3, 4, 5


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def seed_for(*parts: int) -> int:
    """A 63-bit seed mixing all parts (order matters)."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK))
    return h & ((1 << 63) - 1)


def generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from ``parts``; draw on CPU and move, so results match across devices."""
    return torch.Generator().manual_seed(seed_for(*parts))
