"""DDPO (Black et al. 2024, "Training Diffusion Models with Reinforcement Learning"), DDPO_IS: the PPO
clipped ratio on every trained denoising step, with advantages from per-prompt running reward statistics.

The tracker keeps, per prompt (keyed by its text), the last ``buffer_size`` rewards seen for it. Each
iteration all ranks' rewards are gathered with their prompts (global sample order), every prompt's buffer is extended with
its new rewards, and a sample's advantage is (r - mean) / (std + 1e-6) over its prompt's buffer, or over
the whole batch while that buffer holds fewer than ``min_count`` rewards. Every rank runs the same update
on the same gathered values, so the tracker is identical on every rank; it is checkpointed
(algorithm_state.pt) and restored exactly. The reward is the ensemble's weighted sum (``scored.total``),
which replaces the aggregators' group advantages.

DDPO samples with DDIM at eta = 1 on epsilon models (sampler=ddim); any stochastic sampler works.
"""
from __future__ import annotations

from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Hashable, Sequence

import torch

from trainer.algorithms.base import AlgorithmConfig, Batch, Context
from trainer.algorithms.grpo import grpo_loss, n_train_steps, ratio_updates
from trainer.distributed import all_gather_cat

# DDPO's guard against a buffer of equal rewards (0/0); the advantage of such a prompt is 0.
STD_EPS = 1e-6
WEIGHTED_SUM = "rewards.aggregate.WeightedSum"


@dataclass
class DDPOConfig(AlgorithmConfig):
    """conf/algorithm/ddpo.yaml documents each knob."""

    _target_: str = "trainer.algorithms.ddpo.DDPO"
    buffer_size: int = 16
    min_count: int = 16
    adv_clip: float = 5.0
    clip_range: float = 1e-4
    kl_beta: float = 0.0
    timestep_fraction: float = 1.0


SCHEMAS = {"schema_ddpo": DDPOConfig}


class PromptStatTracker:
    """Per-prompt running reward statistics (module docstring), keyed by prompt text, so that a resume with
    a reordered or extended prompts file keeps each prompt's history."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[Hashable, deque] = {}

    def update(self, rewards: torch.Tensor, keys: Sequence[Hashable]) -> tuple[torch.Tensor, float]:
        """Extend each prompt's buffer with its rewards (in the given order) and return the advantages [N]
        fp32 and the share of samples normalised by the batch's statistics (buffer below min_count).

        Statistics in float64 over exact float32 values: the same numbers on every rank and after a resume.
        """
        r = rewards.detach().double().cpu().reshape(-1)
        if len(keys) != len(r):
            raise ValueError(f"got {len(keys)} prompt keys for {len(r)} rewards")
        rows: dict[Hashable, list[int]] = {}
        for i, key in enumerate(keys):
            rows.setdefault(key, []).append(i)
        adv = torch.empty_like(r)
        batch_stats = 0
        for key, idx in rows.items():
            mine = r[idx]
            buf = self.buffers.setdefault(key, deque(maxlen=self.buffer_size))
            buf.extend(mine.tolist())
            if len(buf) < self.min_count:
                ref = r
                batch_stats += len(idx)
            else:
                ref = torch.tensor(list(buf), dtype=torch.float64)
            adv[idx] = (mine - ref.mean()) / (ref.std(unbiased=False) + STD_EPS)
        return adv.float(), batch_stats / max(len(r), 1)

    def state_dict(self) -> dict:
        return {"buffers": {p: list(buf) for p, buf in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {p: deque((float(v) for v in vals), maxlen=self.buffer_size)
                        for p, vals in state["buffers"].items()}

    def rekey_ids(self, prompts: Sequence[str]) -> None:
        """Turn buffers keyed by prompt id (checkpoints written before keys were prompt texts) into buffers
        keyed by ``prompts[id]``."""
        self.buffers = {prompts[k] if isinstance(k, int) else k: buf for k, buf in self.buffers.items()}


class DDPO:
    """DDPO_IS with a per-prompt stat tracker (module docstring)."""

    Config = DDPOConfig
    needs_log_probs = True

    def __init__(self, cfg: DDPOConfig):
        self.cfg = cfg
        self.tracker = PromptStatTracker(cfg.buffer_size, cfg.min_count)

    @classmethod
    def problems(cls, cfg: DDPOConfig, train_cfg, world_size: int) -> list[str]:
        p: list[str] = []
        if cfg.buffer_size < 2:
            p.append(f"algorithm.buffer_size ({cfg.buffer_size}) must be >= 2: a std needs two rewards")
        if not 1 <= cfg.min_count <= cfg.buffer_size:
            p.append(f"algorithm.min_count ({cfg.min_count}) must be in [1, algorithm.buffer_size ({cfg.buffer_size})]: "
                     "a buffer never holds more than buffer_size rewards, so a larger min_count would never be reached")
        if cfg.adv_clip <= 0:
            p.append(f"algorithm.adv_clip ({cfg.adv_clip}) must be > 0")
        if cfg.clip_range <= 0:
            p.append(f"algorithm.clip_range ({cfg.clip_range}) must be > 0")
        if cfg.kl_beta < 0:
            p.append(f"algorithm.kl_beta ({cfg.kl_beta}) must be >= 0")
        if not 0 < cfg.timestep_fraction <= 1:
            p.append(f"algorithm.timestep_fraction ({cfg.timestep_fraction}) must be in (0, 1]")
        agg = train_cfg.aggregate
        target = agg.get("_target_") if isinstance(agg, dict) else getattr(agg, "_target_", None)
        if target != WEIGHTED_SUM:
            p.append(f"aggregate ({target}) is not read by algorithm=ddpo: its per-prompt tracker normalises the "
                     "weighted sum of the rewards itself; use aggregate=weighted_sum")
        regs = sorted(n for n, r in (train_cfg.rewards or {}).items() if isinstance(r, dict) and r.get("role") == "regularizer")
        if regs:
            p.append(f"rewards {regs} have role=regularizer, which algorithm=ddpo cannot honour (its tracker normalises "
                     "the whole weighted sum); give them role=reward or remove them")
        return p

    def needs_reference(self) -> bool:
        return self.cfg.kl_beta > 0

    def micro_steps(self, n_chunks: int, n_stochastic: int) -> int:
        return n_chunks * n_train_steps(self.cfg.timestep_fraction, n_stochastic)

    def rollout_weights(self, policy):
        return nullcontext()

    def advantages(self, batch: Batch, ctx: Context) -> tuple[torch.Tensor, float]:
        """This rank's [N_local] clipped advantages; the tracker sees every rank's rewards in global order."""
        rewards = all_gather_cat(batch.scored.total.float().cpu().reshape(-1))
        pids = all_gather_cat(batch.prompt_ids.cpu())
        if any(isinstance(k, int) for k in self.tracker.buffers):
            self.tracker.rekey_ids(ctx.prompts)
        adv, batch_share = self.tracker.update(rewards, [ctx.prompts[int(p)] for p in pids])
        n = batch.prompt_ids.shape[0]
        local = adv[ctx.world.rank * n : (ctx.world.rank + 1) * n]
        return local.clamp(-self.cfg.adv_clip, self.cfg.adv_clip), batch_share

    def update(self, batch: Batch, ctx: Context) -> dict[str, float]:
        c = self.cfg
        adv, batch_share = self.advantages(batch, ctx)

        def step_loss(log_prob, old_log_prob, a, mean, ref_mean, std, j, traj):
            return grpo_loss(log_prob, old_log_prob, a, c.clip_range, mean, ref_mean, std, c.kl_beta)

        ratio_updates(batch, ctx, adv, c.inner_epochs, c.timestep_fraction, c.kl_beta, step_loss)
        return {"train/tracker_batch_stats_frac": batch_share, "train/tracker_prompts": float(len(self.tracker.buffers))}

    def after_update(self, policy) -> None:
        pass

    def state_dict(self) -> dict:
        return self.tracker.state_dict()

    def load_state_dict(self, state: dict) -> None:
        unknown = sorted(set(state) - {"buffers"})
        if unknown:
            raise ValueError(f"DDPO's algorithm_state.pt holds unknown keys {unknown}; it was written by another algorithm")
        self.tracker.load_state_dict(state)
