"""Flow-GRPO (Liu et al. 2025): group-relative advantages, a clipped ratio on every trained SDE step,
KL of the step mean to the frozen reference.

For each chunk and trained step: recompute the log-prob on the stored trajectory with exactly the
rollout's arithmetic (ratio 1 on-policy), clipped-ratio loss + beta * KL, backward; DeepSpeed steps
the optimizer every chunks x trained steps / optimizer_steps_per_epoch micro-steps.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from trainer.advantages import distributed_advantages
from trainer.algorithms.base import AlgorithmConfig, Batch, Context


@dataclass
class GRPOConfig(AlgorithmConfig):
    """conf/algorithm/grpo.yaml documents each knob."""

    _target_: str = "trainer.algorithms.grpo.GRPO"
    std_scope: str = "global"  # "group": per-prompt std; "global": std over the whole batch (Flow-GRPO's configs)
    adv_clip: float = 5.0
    clip_range: float = 1e-4
    kl_beta: float = 0.04
    kl_convention: str = "flow_grpo"  # "flow_grpo": |mu - mu_ref|^2 / (2 std_t^2), std_t without sqrt(dt) | "exact"
    timestep_fraction: float = 0.99  # share of stochastic steps trained per sample
    timestep_selection: str = "first"  # "first": the first int(f * n) steps in order (Flow-GRPO) | "random": round(f * n) drawn per chunk


SCHEMAS = {"schema_grpo": GRPOConfig}


def grpo_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float,
    mean: torch.Tensor | None = None, ref_mean: torch.Tensor | None = None, std: torch.Tensor | None = None,
    kl_beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-ratio policy loss for one step of a chunk, plus beta * KL to the reference.

    Args:
      log_prob [B] (with grad), old_log_prob [B] (rollout), advantages [B].
      mean, ref_mean [B, *L]: transition means under the policy and the reference; std [B] the scale
        of the KL term: the shared transition std gives the true KL of two Gaussians with equal std,
        |mu - mu_ref|^2 / (2 std^2) per element (algorithm.kl_convention=exact); Flow-GRPO divides by
        the diffusion scale std_t without sqrt(|dt|) instead (``sampler.kl_std``, kl_convention=flow_grpo).
        Averaged over elements like the log-prob.
    Returns: (loss scalar, stats: pg_loss, kl, clip_frac, log_ratio_abs_max — all detached).
    """
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    pg_loss = torch.maximum(unclipped, clipped).mean()
    kl = torch.zeros((), device=log_prob.device)
    if kl_beta > 0:
        kl = (((mean - ref_mean) ** 2).flatten(1).mean(1) / (2 * std**2)).mean()
    loss = pg_loss + kl_beta * kl
    stats = {
        "pg_loss": pg_loss.detach(),
        "kl": kl.detach(),
        "clip_frac": ((ratio - 1).abs() > clip_range).float().mean().detach(),
        "log_ratio_abs_max": log_ratio.abs().max().detach(),
    }
    return loss, stats


def check_group_knobs(cfg, problems: list[str]) -> None:
    """Rules of the advantage knobs shared by the GRPO family."""
    if cfg.std_scope not in ("group", "global"):
        problems.append(f"algorithm.std_scope ({cfg.std_scope!r}) must be 'group' or 'global'")
    if cfg.adv_clip <= 0:
        problems.append(f"algorithm.adv_clip ({cfg.adv_clip}) must be > 0")


KL_CONVENTIONS = ("flow_grpo", "exact")
TIMESTEP_SELECTIONS = ("first", "random")


def n_train_steps(timestep_fraction: float, n_stochastic: int, selection: str = "random") -> int:
    """Stochastic steps trained per chunk (at least one): Flow-GRPO's int(f * n) for "first"
    (0.99 of 10 -> 9: the last, least noisy step is never trained), round(f * n) for "random"."""
    n = int(timestep_fraction * n_stochastic) if selection == "first" else round(timestep_fraction * n_stochastic)
    return max(1, n)


def check_step_knobs(cfg, problems: list[str]) -> None:
    """Rules of the KL-convention and step-selection knobs of the GRPO family."""
    if cfg.kl_convention not in KL_CONVENTIONS:
        problems.append(f"algorithm.kl_convention ({cfg.kl_convention!r}) must be one of {KL_CONVENTIONS}")
    if cfg.timestep_selection not in TIMESTEP_SELECTIONS:
        problems.append(f"algorithm.timestep_selection ({cfg.timestep_selection!r}) must be one of {TIMESTEP_SELECTIONS}")


def group_advantages(batch: Batch, ctx: Context, std_scope: str, adv_clip: float) -> tuple[torch.Tensor, dict]:
    """[N_local] clipped group-relative advantages of the trained rewards (aggregated as configured) and the
    aggregation stats; groups may span ranks."""
    adv, stats = distributed_advantages(
        batch.scored.per_reward, ctx.rewards.weights, ctx.rewards.regularizers, batch.prompt_ids, ctx.world.rank,
        ctx.aggregator, std_scope,
    )
    return adv.clamp(-adv_clip, adv_clip), stats


# step_loss(log_prob, old_log_prob, adv_j, mean, ref_mean, std, j, traj) -> (loss, detached stats)
StepLoss = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


def ratio_updates(
    batch: Batch, ctx: Context, adv: torch.Tensor, inner_epochs: int, timestep_fraction: float, kl_beta: float,
    step_loss: StepLoss, selection: str = "random",
) -> None:
    """The reverse-process update shared by the GRPO family: for each inner epoch, chunk (in this
    rank's drawn order) and trained stochastic step j, recompute the step's log-prob on the stored
    trajectory (and the reference's mean when kl_beta > 0) and backward ``step_loss``.

    adv: [N_local] (one advantage per sample) or [N_local, S] (one per step).
    selection: "first" trains the first int(f * n) stochastic steps in chain order (Flow-GRPO), "random"
      round(f * n) steps drawn per chunk.
    """
    adv = adv.to(ctx.policy.device)
    mb = ctx.cfg.train.micro_batch
    n_chunks = len(batch.chunks)
    for epoch in range(inner_epochs):
        for ci in ctx.chunk_order(n_chunks):
            traj = batch.chunks[ci]
            a = adv[ci * mb : (ci + 1) * mb]
            cond = ctx.encode(traj)
            stochastic = traj.stochastic[0].nonzero().flatten()
            # Which steps a chunk trains is drawn per global chunk index, so 1 and N processes train
            # the same (sample, step) pairs and a resume on another world size continues alike.
            n_train = n_train_steps(timestep_fraction, len(stochastic), selection)
            if selection == "first":
                steps = stochastic[:n_train]
            else:
                g_steps = ctx.generator(epoch, ctx.world.rank * n_chunks + ci, 1)
                steps = stochastic[torch.randperm(len(stochastic), generator=g_steps)[:n_train]]
            for j in steps.tolist():
                ref_mean = None
                if kl_beta > 0:
                    with torch.no_grad(), ctx.policy.reference():
                        _, ref_mean, _ = ctx.sampler.log_prob(ctx.predict, traj, j, cond)
                log_prob, mean, std = ctx.sampler.log_prob(ctx.predict, traj, j, cond)
                a_j = a[:, j] if a.dim() == 2 else a
                loss, stats = step_loss(log_prob, traj.log_probs[:, j], a_j, mean, ref_mean, std, j, traj)
                ctx.backward(loss, stats)


class GRPO:
    """Flow-GRPO: one advantage per sample, clipped ratio + KL on each trained step."""

    Config = GRPOConfig
    needs_log_probs = True

    def __init__(self, cfg: GRPOConfig):
        self.cfg = cfg

    @classmethod
    def problems(cls, cfg: GRPOConfig, train_cfg, world_size: int) -> list[str]:
        p: list[str] = []
        check_group_knobs(cfg, p)
        check_step_knobs(cfg, p)
        if not 0 < cfg.timestep_fraction <= 1:
            p.append(f"algorithm.timestep_fraction ({cfg.timestep_fraction}) must be in (0, 1]")
        if cfg.clip_range <= 0:
            p.append(f"algorithm.clip_range ({cfg.clip_range}) must be > 0")
        if cfg.kl_beta < 0:
            p.append(f"algorithm.kl_beta ({cfg.kl_beta}) must be >= 0")
        return p

    def needs_reference(self) -> bool:
        return self.cfg.kl_beta > 0

    def micro_steps(self, n_chunks: int, n_stochastic: int) -> int:
        return n_chunks * n_train_steps(self.cfg.timestep_fraction, n_stochastic, self.cfg.timestep_selection)

    def rollout_weights(self, policy):
        return nullcontext()

    def update(self, batch: Batch, ctx: Context) -> dict[str, float]:
        c = self.cfg
        adv, agg_stats = group_advantages(batch, ctx, c.std_scope, c.adv_clip)

        def step_loss(log_prob, old_log_prob, a, mean, ref_mean, std, j, traj):
            kl_std = ctx.sampler.kl_std(traj, j, std, c.kl_convention)
            return grpo_loss(log_prob, old_log_prob, a, c.clip_range, mean, ref_mean, kl_std, c.kl_beta)

        ratio_updates(batch, ctx, adv, c.inner_epochs, c.timestep_fraction, c.kl_beta, step_loss, c.timestep_selection)
        return {f"train/{k}": v for k, v in agg_stats.items()}

    def after_update(self, policy) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"GRPO keeps no state, but the checkpoint's algorithm_state.pt holds {sorted(state)}")
