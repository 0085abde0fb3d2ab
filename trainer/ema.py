"""An exponential moving average of the policy's trainable weights (``train.ema_decay``).

    ema <- d_n * ema + (1 - d_n) * weights        after every ``train.ema_every``-th iteration's update

d_n = decay, or with ``train.ema_warmup`` d_n = min(decay, (1 + n) / (10 + n)), n the optimizer steps
taken so far (Flow-GRPO's and DiffusionNFT's ramp: the first updates follow the weights closely).
Flow-GRPO updates its EMA (decay 0.9, ramp) every 8 optimizer steps: with 2 optimizer steps per
iteration that is ``ema_every: 4``. DanceGRPO's (0.995) is a plain per-iteration EMA.

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

    def __init__(self, module: torch.nn.Module, decay: float, every: int = 1, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"train.ema_decay ({decay}) must be in [0, 1)")
        if every < 1:
            raise ValueError(f"train.ema_every ({every}) must be >= 1")
        self.decay, self.every, self.warmup = float(decay), int(every), bool(warmup)
        self.params = {k: p for k, p in module.named_parameters() if p.requires_grad}
        self.shadow = {k: p.detach().float().clone() for k, p in self.params.items()}

    def decay_at(self, optimizer_steps: int) -> float:
        """d_n after ``optimizer_steps`` optimizer steps (a pure function: nothing to checkpoint)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + optimizer_steps) / (10 + optimizer_steps))

    @torch.no_grad()
    def update(self, iteration: int = 1, optimizer_steps: int = 0) -> bool:
        """After iteration ``iteration`` (1-based) with ``optimizer_steps`` optimizer steps taken so far;
        updates only every ``every``-th iteration. Returns whether it updated."""
        if iteration % self.every:
            return False
        d = self.decay_at(optimizer_steps)
        for k, p in self.params.items():
            self.shadow[k].mul_(d).add_(p.detach().float(), alpha=1.0 - d)
        return True

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
