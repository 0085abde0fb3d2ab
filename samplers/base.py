"""The contracts of the sampler family: what the trainer calls, and what each transition kernel provides.

The trainer only sees ``Sampler``. Every concrete sampler is a ``samplers.chain.ChainSampler`` (the
rollout loop, windows, noise schedules, guidance) around one ``Kernel`` (the math of one step), or
``samplers.ode.ODESampler`` (deterministic only). Nothing here knows a model family: a sampler needs a
function that predicts the kernel's target (velocity for flow matching, epsilon for DDIM) and the
schedule of noise levels the policy adapter reports.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from samplers.trajectory import Trajectory

# predict_fn(x [B, *L] fp32, sigma [B] fp32, cond) -> model output [B, *L] (any float dtype):
# velocity for flow-matching kernels, epsilon for the DDIM kernel.
PredictFn = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: str) -> torch.Tensor:
    """Log-density of ``x`` under N(mean, std^2 I), reduced over all but the batch dim.

    Args:
      x, mean: [B, *L]; std: [B] (one isotropic scale per sample), all fp32.
      reduction: "sum" gives the true log-density of the whole sample; "mean" divides it by the
        number of elements (Flow-GRPO's convention, which keeps ratios on the scale its clip
        ranges were tuned for).
    Returns: [B] fp32.
    """
    std = std.reshape(-1, *([1] * (x.dim() - 1)))
    elem = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    if reduction == "sum":
        return elem.flatten(1).sum(1)
    if reduction == "mean":
        return elem.flatten(1).mean(1)
    raise ValueError(f"sampler.log_prob_reduction must be 'sum' or 'mean', got {reduction!r}")


def per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] broadcastable against ``like`` [B, *L]."""
    return t.reshape(-1, *([1] * (like.dim() - 1)))


@dataclass(frozen=True)
class Plan:
    """Which steps of one iteration's chain draw noise, and how much.

    stochastic: [S] bool over the whole chain (steps before the sampler's start_step are never
      stochastic); noise_levels: [S] fp32, the eta of each stochastic step (0 elsewhere).
    The same plan is used for every sample of an iteration on every rank.
    """

    stochastic: torch.Tensor
    noise_levels: torch.Tensor

    @property
    def num_stochastic(self) -> int:
        return int(self.stochastic.sum())


class Kernel(Protocol):
    """The math of one step of a chain, in fp32. ``sigmas`` are the policy's noise levels [B, S+1].

    A kernel writes the state as x = alpha * x0 + s * noise (flow matching: alpha = 1 - sigma,
    s = sigma; VP diffusion: alpha = sqrt(1 - sigma^2), s = sigma).
    """

    prediction: str  # what predict_fn must return: "velocity" | "epsilon"
    max_noise_level: float  # largest eta the formula is defined for (inf when unbounded)
    std_carries_sqrt_dt: bool  # the transition std is a diffusion scale times sqrt(sigma_j - sigma_{j+1})

    def transition(
        self, x: torch.Tensor, out: torch.Tensor, sigmas: torch.Tensor, j: int, eta: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [B, *L], std [B]) of step j at noise level eta; eta 0 is the kernel's deterministic step."""
        ...

    def clean(self, x: torch.Tensor, out: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The clean prediction x0_hat [B, *L] at noise level sigma [B]."""
        ...

    def alpha_sigma(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, s), each shaped like sigma."""
        ...

    def can_be_stochastic(self, sigmas: torch.Tensor) -> torch.Tensor:
        """[S] bool for a schedule [S+1] (CPU): steps whose noise is not zero by construction.

        Raises ValueError for a schedule the kernel cannot use (e.g. a flow schedule given to DDIM).
        """
        ...


class Sampler(Protocol):
    """What the trainer calls. Implemented by ChainSampler (and its per-kernel subclasses) and ODESampler."""

    num_steps: int  # steps of training rollouts
    eval_num_steps: int  # steps of evaluation (deterministic)
    guidance_scale: float  # classifier-free guidance passed to the policy (1 = off)
    start_step: int  # partial chains start at sigmas[start_step] (0 = from pure noise)
    needs_step_rewards: bool  # True when calibrate() wants per-step reward gains each iteration

    @classmethod
    def problems(cls, knobs: dict) -> list[str]:
        """Every rule the knobs (the sampler's config as a dict, without _target_) break; checked by
        trainer/config.validate before anything is built."""
        ...

    def plan(self, sigmas: torch.Tensor, iteration: int = 0, generator: torch.Generator | None = None) -> Plan: ...

    def rollout(
        self, predict_fn: PredictFn, x_T: torch.Tensor, sigmas: torch.Tensor, cond: object,
        generators: Sequence[torch.Generator], prompt_ids: torch.Tensor, sample_ids: torch.Tensor,
        plan: Plan | None = None,
    ) -> Trajectory: ...

    def log_prob(
        self, predict_fn: PredictFn, traj: Trajectory, j: int, cond: object
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def start(self, x0: torch.Tensor, sigmas: torch.Tensor, noise: torch.Tensor) -> torch.Tensor: ...

    def evaluation(self) -> "Sampler": ...

    def calibrate(self, positive_fraction: torch.Tensor) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...
