"""A reward that turns NaN on chosen training calls, for the non-finite guard's tests (imported by Hydra
through PYTHONPATH in the test's subprocess)."""
from __future__ import annotations

import torch


class NaNOnCalls:
    """Mean brightness, except NaN for sample 0 on the listed calls (1-based) with ``batch_size`` images.

    Counting only batches of the training size keeps evaluation calls (another size) out of the count.
    ``calls`` empty means every such call.
    """

    input_kind = "pixels"
    differentiable = False

    def __init__(self, batch_size: int, calls: list[int] | None = None):
        self.batch_size, self.calls, self.seen = batch_size, set(calls or []), 0

    def __call__(self, images: torch.Tensor, prompts, metadata=None) -> torch.Tensor:
        out = images.float().mean(dim=(1, 2, 3))
        if len(prompts) == self.batch_size:
            self.seen += 1
            if not self.calls or self.seen in self.calls:
                out[0] = float("nan")
        return out

    def state_dict(self) -> dict:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.seen = state["seen"]
