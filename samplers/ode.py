"""Deterministic sampling of flow-matching models: Euler, or DPM-Solver++(2M) (second order, multistep).

``euler`` is the diffusers FlowMatchEulerDiscreteScheduler step x' = x + (sigma' - sigma) v. ``dpm2`` is
DPM-Solver++(2M) in its data-prediction form (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided
Sampling of Diffusion Probabilistic Models"), which reuses the previous step's clean prediction for
second order at no extra model call; MixGRPO-Flash (Li et al. 2025) uses it outside the stochastic
window. Every stochastic sampler takes the same ``ode_solver`` knob for its deterministic steps; this
one has no noise at all (evaluation, sampling; not trainable by GRPO). For a VP (epsilon) model use
``sampler=ddim`` with ``noise_level=0``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch

from samplers.base import Plan, PredictFn
from samplers.flow_sde import FlowSDESampler
from samplers.schedule import knob_problems
from samplers.trajectory import Trajectory


@dataclass(kw_only=True)
class ODESampler:
    """The probability-flow ODE of a flow-matching model (knobs: conf/sampler/ode.yaml)."""

    num_steps: int = 10
    eval_num_steps: int = 10
    guidance_scale: float = 4.5
    ode_solver: str = "euler"
    start_step: int = 0
    needs_step_rewards: ClassVar[bool] = False
    chain: FlowSDESampler = field(init=False, repr=False)

    def __post_init__(self) -> None:
        problems = self.problems(self.knobs())
        if problems:
            raise ValueError("invalid sampler knobs:\n  - " + "\n  - ".join(problems))
        # The flow kernel at noise 0 is the ODE step: one implementation of the loop.
        self.chain = FlowSDESampler(
            noise_level=0.0, num_steps=self.num_steps, eval_num_steps=self.eval_num_steps,
            guidance_scale=self.guidance_scale, ode_solver=self.ode_solver, start_step=self.start_step,
        )

    @classmethod
    def problems(cls, knobs: dict) -> list[str]:
        return knob_problems(knobs)

    def knobs(self) -> dict:
        return {k: getattr(self, k) for k in ("num_steps", "eval_num_steps", "guidance_scale", "ode_solver", "start_step")}

    def plan(self, sigmas: torch.Tensor, iteration: int = 0, generator: torch.Generator | None = None) -> Plan:
        return self.chain.plan(sigmas)

    def rollout(
        self, predict_fn: PredictFn, x_T: torch.Tensor, sigmas: torch.Tensor, cond: object,
        generators: Sequence[torch.Generator], prompt_ids: torch.Tensor, sample_ids: torch.Tensor,
        plan: Plan | None = None,
    ) -> Trajectory:
        return self.chain.rollout(predict_fn, x_T, sigmas, cond, generators, prompt_ids, sample_ids, plan)

    def log_prob(self, predict_fn, traj, j, cond):
        raise ValueError("sampler=ode has no stochastic steps, so no log-prob to train; use flow_sde, dance_sde, cps or ddim")

    def start(self, x0: torch.Tensor, sigmas: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.chain.start(x0, sigmas, noise)

    def evaluation(self) -> "ODESampler":
        return ODESampler(num_steps=self.eval_num_steps, eval_num_steps=self.eval_num_steps,
                          guidance_scale=self.guidance_scale, ode_solver=self.ode_solver)

    def calibrate(self, positive_fraction: torch.Tensor) -> None:
        raise ValueError("sampler=ode has no noise to calibrate")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"checkpoint holds sampler state {sorted(state)}; sampler=ode has none")
