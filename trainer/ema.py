"""An exponential moving average of the policy's trainable weights (``train.ema_decay``).

    ema <- decay * ema + (1 - decay) * weights        after every iteration's update

Kept in fp32 on the weights' device, keyed like ``policy.trainable_state_dict()`` so it is saved as
``ema.safetensors`` beside ``policy.safetensors`` in every checkpoint (restored on resume, bit-exact),
evaluated instead of the raw weights while it is enabled, and exported with ``launch.export ema=true``.
Flow-GRPO keeps one for the same reason: the raw weights of an RL run are noisy from step to step.
ZeRO-3 shards the weights across ranks, so the config check refuses the EMA there.
"""
from __future__ import annotations

import contextlib

import torch


class PolicyEMA:
    """EMA of the trainable parameters of ``module`` (those with requires_grad)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"train.ema_decay ({decay}) must be in [0, 1)")
        self.decay = float(decay)
        self.params = {k: p for k, p in module.named_parameters() if p.requires_grad}
        self.shadow = {k: p.detach().float().clone() for k, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for k, p in self.params.items():
            self.shadow[k].mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self):
        """Within this context the module computes with the EMA weights; the trained ones come back after."""
        saved = {k: p.detach().clone() for k, p in self.params.items()}
        for k, p in self.params.items():
            p.copy_(self.shadow[k].to(p.dtype))
        try:
            yield
        finally:
            for k, p in self.params.items():
                p.copy_(saved[k])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{parameter name: fp32 tensor on CPU}, the names of policy.trainable_state_dict()."""
        return {k: v.detach().cpu().clone() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            missing, unknown = sorted(set(self.shadow) - set(state)), sorted(set(state) - set(self.shadow))
            raise KeyError(f"the checkpoint's EMA does not match the trainable weights: missing {missing[:3]}, "
                           f"unknown {unknown[:3]}")
        for k, v in state.items():
            self.shadow[k].copy_(v.to(self.shadow[k].device, torch.float32))
