"""A reward that turns NaN on chosen training calls, for the non-finite guard's tests (imported by Hydra
through PYTHONPATH in the test's subprocess)."""
from __future__ import annotations

import torch


class NaNOnCalls:
    """Mean brightness, except NaN for sample 0 on the listed training calls (1-based; empty = all).

    A training call is one whose metadata holds samples other than sample 0 of their prompt
    (evaluation draws sample 0 only). With rewards overlapped with sampling, each rollout chunk is a
    call: 16 samples per step in chunks of 8 make calls 2k-1 and 2k belong to step k.
    """

    input_kind = "pixels"
    differentiable = False

    def __init__(self, calls: list[int] | None = None):
        self.calls, self.seen = set(calls or []), 0

    def __call__(self, images: torch.Tensor, prompts, metadata=None) -> torch.Tensor:
        out = images.float().mean(dim=(1, 2, 3))
        if metadata and any(m["sample_id"] > 0 for m in metadata):
            self.seen += 1
            if not self.calls or self.seen in self.calls:
                out[0] = float("nan")
        return out

    def state_dict(self) -> dict:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.seen = state["seen"]
