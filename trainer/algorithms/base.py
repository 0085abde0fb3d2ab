"""The contract between the training loop (trainer/loop.py) and an algorithm.

The loop owns everything the algorithms share: drawing prompts, rolling out, scoring, logging,
evaluating, checkpointing, preemption. After each scored rollout it hands the algorithm a ``Batch``
and a ``Context``; the algorithm turns them into losses and calls ``ctx.backward(loss, stats)`` once
per micro-step, which runs DeepSpeed's backward and (at accumulation boundaries) the guarded optimizer
step. One class per algorithm, selected by ``algorithm=<name>`` (``_target_`` in conf/algorithm/<name>.yaml,
whose typed schema is the class's config dataclass, registered from ``SCHEMAS`` in its module).
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from samplers.trajectory import Trajectory
from trainer.checkpoint import fault_point
from trainer.engine import optimizer_step
from trainer.rng import STREAM_TRAIN, generator


@dataclass
class AlgorithmConfig:
    """Knobs every algorithm has; each algorithm's schema extends it (and documents its own)."""

    _target_: str = "trainer.algorithms.grpo.GRPO"
    group_size: int = 8  # samples per prompt (G); groups may span ranks (rewards are gathered by prompt id)
    inner_epochs: int = 1  # passes over each batch of rollouts
    optimizer_steps_per_epoch: int = 1  # the chunks of one pass are split evenly between this many optimizer steps
    max_grad_norm: float = 1.0  # gradient clipping (DeepSpeed)


def flow_only_problem(train_cfg: Any, algorithm: str) -> list[str]:
    """[message] when the sampler (hence the model: see trainer.config.check_prediction) is not a
    flow-matching one; for algorithms that noise clean samples with the rectified-flow forward process
    x_t = (1 - t) x0 + t noise and regress velocities, which is wrong for epsilon (VP) models."""
    from hydra.utils import get_class

    kernel = getattr(get_class(train_cfg.sampler._target_), "kernel", None)
    if getattr(kernel, "prediction", "velocity") != "velocity":
        return [f"algorithm={algorithm} trains flow-matching (velocity) models with the rectified-flow forward "
                f"process; {train_cfg.sampler._target_} samples an epsilon (VP) model, which it does not support: "
                "use algorithm=ddpo, grpo or grpo_guard for SD1.x/SDXL"]
    return []


@dataclass
class Batch:
    """One iteration's scored rollouts on this rank (N_local samples in chunks of train.micro_batch).

    chunks: trajectories, one per micro-batch, in sample order; images [N_local, 3, H, W] in [0, 1] (CPU);
    scored: the RewardResult (total, per_reward, components) of every sample; prompt_ids / sample_ids [N_local];
    prompts: the local prompt strings; meta: per-sample reward metadata.
    """

    chunks: list[Trajectory]
    images: torch.Tensor
    scored: Any
    prompt_ids: torch.Tensor
    sample_ids: torch.Tensor
    prompts: list[str]
    meta: list[dict]


@dataclass
class Stepper:
    """Bookkeeping of the optimizer steps of one iteration (norms, skips, per-micro-step stats)."""

    engine: Any
    guard: Any
    state: dict  # the loop's persistent counters: consecutive_skips is updated here
    step: int  # the iteration being trained (1-based in fault points)
    grad_norms: list[float] = field(default_factory=list)
    skipped: int = 0
    stats: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    onpolicy_dev: torch.Tensor = field(default_factory=lambda: torch.zeros(()))

    def backward(self, loss: torch.Tensor, stats: dict[str, torch.Tensor] | None = None) -> None:
        """Backward one micro-step's loss; the optimizer steps at each accumulation boundary.

        ``stats`` (detached scalars) are logged as ``train/<key>`` means over micro-steps and ranks;
        ``log_ratio_abs_max`` is instead checked on-policy: before the first optimizer step of an
        iteration the recomputed log-prob must equal the rollout's (the ratio is exactly 1).
        """
        stats = dict(stats or {})
        if not torch.isfinite(loss):
            self.guard.force_skip = True  # finite gradients from a non-finite loss are not trusted either
        self.engine.backward(loss)
        fault_point("train.mid_update", self.step)
        onpolicy = stats.pop("log_ratio_abs_max", None)
        if onpolicy is not None and not self.grad_norms:
            # Nothing has been updated before the first optimizer step: the ratio must be exactly 1.
            self.onpolicy_dev = torch.maximum(self.onpolicy_dev, onpolicy.detach().float().cpu())
        norm, was_skipped = optimizer_step(self.engine, self.guard)
        if norm is not None:
            self.grad_norms.append(norm)
            self.skipped += was_skipped
            self.state["consecutive_skips"] = self.state["consecutive_skips"] + 1 if was_skipped else 0
        stats["loss"] = loss.detach()
        for k, v in stats.items():
            self.stats.setdefault(f"train/{k}", []).append(v.detach().float().cpu().reshape(()))


@dataclass
class Context:
    """What an update may use: the models, the engine, this iteration's identity, shared helpers."""

    cfg: Any  # the whole TrainConfig
    policy: Any
    sampler: Any
    rewards: Any  # the trained RewardEnsemble
    aggregator: Any
    world: Any
    prompts: list[str]  # the run's prompt table (trajectories carry indices into it)
    step: int  # 0-based iteration
    stepper: Stepper
    _order: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._order = self.generator(self.world.rank)

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, cond: object) -> torch.Tensor:
        """The policy's prediction with the sampler's guidance scale (the rollout's predict_fn)."""
        return self.policy.predict(x, sigma, cond, self.sampler.guidance_scale)

    def encode(self, traj: Trajectory) -> object:
        return self.policy.encode([self.prompts[int(p)] for p in traj.prompt_ids])

    def generator(self, *parts: int) -> torch.Generator:
        """A generator for this iteration's training draws, keyed by ``parts`` (never ambient RNG)."""
        return generator(self.cfg.seed, STREAM_TRAIN, self.step, *parts)

    def backward(self, loss: torch.Tensor, stats: dict[str, torch.Tensor] | None = None) -> None:
        self.stepper.backward(loss, stats)

    def chunk_order(self, n_chunks: int) -> list[int]:
        """This rank's chunk order for one pass (drawn from the iteration's per-rank generator)."""
        return torch.randperm(n_chunks, generator=self._order).tolist()


class Algorithm(Protocol):
    """One training method (a class per algorithm; no shared base implementation to track).

    Built as ``cls(cfg)`` with its typed config; ``Config`` names that dataclass.
    """

    Config: ClassVar[type]
    # True: trains reverse-process log-probs, so the sampler must draw noise (an SDE or DDIM with eta > 0).
    needs_log_probs: ClassVar[bool]

    @classmethod
    def problems(cls, cfg: AlgorithmConfig, train_cfg: Any, world_size: int) -> list[str]:
        """Every broken rule of this algorithm's knobs (and of what it needs from the rest of the config)."""
        ...

    def needs_reference(self) -> bool:
        """Whether the policy must keep its frozen reference (KL, DPO)."""
        ...

    def micro_steps(self, n_chunks: int, n_stochastic: int) -> int:
        """Backward calls per inner epoch on one rank; DeepSpeed accumulates micro_steps /
        optimizer_steps_per_epoch of them per optimizer step. Must be the same every iteration."""
        ...

    def rollout_weights(self, policy) -> AbstractContextManager:
        """Context under which the rollout samples (``contextlib.nullcontext()``, or e.g. NFT's EMA "old" policy)."""
        ...

    def update(self, batch: Batch, ctx: Context) -> dict[str, float]:
        """All inner epochs of one iteration, each micro-step through ``ctx.backward``; returns extra
        metrics that are already global (the same on every rank)."""
        ...

    def after_update(self, policy) -> None:
        """Called after every iteration's update (e.g. an EMA step)."""
        ...

    def state_dict(self) -> dict:
        """What changes over training besides the weights (running baselines, EMA); checkpointed
        (algorithm_state.pt) and restored with load_state_dict on resume."""
        ...

    def load_state_dict(self, state: dict) -> None: ...
