"""Rewards that fail in chosen ways, for the worker-process tests (imported by the spawned worker)."""
from __future__ import annotations

import os
import time

import torch


class Raises:
    input_kind = "pixels"
    differentiable = False

    def __call__(self, images, prompts, metadata=None):
        raise ValueError("the scorer rejected this batch")


class Dies:
    """Exits its process without a word, as a segfaulting native library would."""

    input_kind = "pixels"
    differentiable = False

    def __call__(self, images, prompts, metadata=None):
        os._exit(3)


class Stalls:
    input_kind = "pixels"
    differentiable = False

    def __init__(self, seconds: float = 60.0):
        self.seconds = seconds

    def __call__(self, images, prompts, metadata=None):
        time.sleep(self.seconds)
        return torch.zeros(len(prompts))


class Counts:
    """Brightness, plus a call counter as state (to check state_dict crosses the process boundary)."""

    input_kind = "pixels"
    differentiable = False

    def __init__(self):
        self.calls = 0

    def __call__(self, images, prompts, metadata=None):
        self.calls += 1
        return images.float().mean(dim=(1, 2, 3))

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]
