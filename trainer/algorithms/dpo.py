"""Online Diffusion-DPO in flow-matching form (Wallace et al. 2023, "Diffusion Model Alignment Using Direct
Preference Optimization"; the velocity form of Flow-DPO, Liu et al. 2025, "Improving Video Generation with
Human Feedback").

Preference pairs are formed within each group of the rollout (the same prompt): ``pairs=best_worst``
pairs the group's best with its worst sample; ``pairs=all`` takes every ordered pair, weighted by its
advantage gap (as DP^2O-SR weights pairs by reward gap). Winner w and loser l are noised at the same
t with the same noise, x_t = (1 - t) x0 + t noise, and with the velocity errors
e(x) = mean ||v(x_t) - (noise - x0)||^2 of the policy and the frozen reference,

    loss = -log sigmoid(-beta / 2 * ((e_theta(w) - e_ref(w)) - (e_theta(l) - e_ref(l))))

averaged over pairs with their weights. Likelihood-free: any sampler (the ODE included) rolls out.

Every sample of a group shares its (t, noise), so a pair's loss depends only on the per-sample
differences d = e_theta - e_ref: the update first computes d for every sample without gradients,
gathers the scalars (groups may span chunks and ranks), takes the exact pairwise loss and its
gradient dL/dd, then backpropagates ``sum_i dL/dd_i * e_theta(i)`` chunk by chunk, which has the
gradient of the whole-batch pairwise loss. That costs one extra forward per sample, and it is why
the chunks of one pass share one optimizer step.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.advantages import distributed_advantages
from trainer.algorithms.base import AlgorithmConfig, Batch, Context, flow_only_problem
from trainer.distributed import all_gather_cat


@dataclass
class DPOConfig(AlgorithmConfig):
    """conf/algorithm/dpo.yaml documents each knob."""

    _target_: str = "trainer.algorithms.dpo.DPO"
    beta: float = 500.0  # inverse temperature of the implicit reward
    pairs: str = "best_worst"  # "best_worst" | "all" (every pair of the group, weighted by its advantage gap)
    std_scope: str = "group"  # units of the advantages that rank samples (and weigh pairs with pairs=all)


SCHEMAS = {"schema_dpo": DPOConfig}

PAIRS = ("best_worst", "all")


def pair_weights(scores: torch.Tensor, prompt_ids: torch.Tensor, pairs: str) -> torch.Tensor:
    """[N, N] weight of the pair (winner i, loser j); 0 where i and j are not a pair.

    Pairs are within a group (same prompt id) and strictly ordered by ``scores`` [N] (ties form no pair).
    best_worst: weight 1 for (the group's best, its worst), the first index of each in sample order;
    all: weight scores_i - scores_j for every i > j in score.
    """
    same = prompt_ids[:, None] == prompt_ids[None, :]
    gap = scores[:, None] - scores[None, :]
    if pairs == "all":
        return torch.where(same & (gap > 0), gap, torch.zeros_like(gap))
    if pairs != "best_worst":
        raise ValueError(f"pairs must be one of {PAIRS}, got {pairs!r}")
    w = torch.zeros_like(gap)
    for p in torch.unique(prompt_ids):
        idx = (prompt_ids == p).nonzero().flatten()
        best, worst = idx[scores[idx].argmax()], idx[scores[idx].argmin()]
        if scores[best] > scores[worst]:
            w[best, worst] = 1.0
    return w


def dpo_pair_loss(d: torch.Tensor, weights: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted mean DPO loss over the pairs of ``weights`` [N, N] (winner row, loser column).

    d [N]: e_theta - e_ref per sample (velocity errors of policy and reference at the sample's shared
    t and noise). Pair (w, l): softplus(beta / 2 * (d_w - d_l)) = -log sigmoid(-beta / 2 * (d_w - d_l)).
    Returns (loss scalar, detached stats: pair_acc = weighted share of pairs whose winner the policy
    fits better than the loser relative to the reference, margin = weighted mean of -(d_w - d_l),
    num_pairs). With no pair (every group tied) the loss is 0.
    """
    diff = d[:, None] - d[None, :]
    total = weights.sum()
    denom = total.clamp_min(torch.finfo(weights.dtype).tiny)
    loss = (weights * F.softplus(beta / 2 * diff)).sum() / denom
    stats = {
        "pair_acc": ((weights * (diff < 0)).sum() / denom).detach(),
        "margin": ((weights * -diff).sum() / denom).detach(),
        "num_pairs": (weights > 0).sum().float(),
    }
    return loss, stats


def velocity_error(v: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """[B] mean over elements of (v - (noise - x0))^2, in fp32."""
    return ((v.float() - (noise - x0).float()) ** 2).flatten(1).mean(1)


class DPO:
    """Online Diffusion-/Flow-DPO on pairs formed within each rollout group."""

    Config = DPOConfig
    needs_log_probs = False

    def __init__(self, cfg: DPOConfig):
        self.cfg = cfg

    @classmethod
    def problems(cls, cfg: DPOConfig, train_cfg, world_size: int) -> list[str]:
        p: list[str] = flow_only_problem(train_cfg, "dpo")
        if cfg.pairs not in PAIRS:
            p.append(f"algorithm.pairs ({cfg.pairs!r}) must be one of {list(PAIRS)}")
        if cfg.std_scope not in ("group", "global"):
            p.append(f"algorithm.std_scope ({cfg.std_scope!r}) must be 'group' or 'global'")
        if cfg.beta <= 0:
            p.append(f"algorithm.beta ({cfg.beta}) must be > 0")
        if cfg.optimizer_steps_per_epoch != 1:
            p.append(f"algorithm.optimizer_steps_per_epoch ({cfg.optimizer_steps_per_epoch}) must be 1 for algorithm=dpo: "
                     "a pair's two samples may sit in different chunks, so the whole pass is one gradient; use "
                     "algorithm.inner_epochs for more optimizer steps per rollout")
        return p

    def needs_reference(self) -> bool:
        return True

    def micro_steps(self, n_chunks: int, n_stochastic: int) -> int:
        return n_chunks

    def rollout_weights(self, policy):
        return nullcontext()

    def update(self, batch: Batch, ctx: Context) -> dict[str, float]:
        c = self.cfg
        adv, agg_stats = distributed_advantages(
            batch.scored.per_reward, ctx.rewards.weights, ctx.rewards.regularizers, batch.prompt_ids, ctx.world.rank,
            ctx.aggregator, c.std_scope,
        )
        all_adv, all_pids = all_gather_cat(adv.float().cpu()), all_gather_cat(batch.prompt_ids.cpu())
        weights = pair_weights(all_adv, all_pids, c.pairs)
        n_local, rank = len(batch.prompt_ids), ctx.world.rank
        # The gradient of the pairwise loss reaches each micro-step through DeepSpeed's mean over
        # micro-steps and ranks: scale the surrogate back up by their number.
        n_micro_global = ctx.world.world_size * len(batch.chunks)
        for epoch in range(c.inner_epochs):
            # One (t, noise) per group, keyed by the prompt id: winner and loser share them, on any rank.
            noised = []
            for traj in batch.chunks:
                sig, noise = [], []
                for pid in traj.prompt_ids.tolist():
                    g = ctx.generator(epoch, pid)
                    j = int(torch.randint(traj.sigmas.shape[1] - 1, (1,), generator=g))
                    sig.append(traj.sigmas[0, j].cpu())
                    noise.append(torch.randn(traj.final.shape[1:], generator=g))
                sig = torch.stack(sig).to(traj.final.device)
                noise = torch.stack(noise).to(traj.final.device)
                s = sig.reshape(-1, *([1] * (traj.final.dim() - 1)))
                x0 = traj.final.float()
                noised.append((x0, noise, sig, (1 - s) * x0 + s * noise))
            # Pass 1, no gradients: d = e_theta - e_ref for every local sample.
            d = []
            with torch.no_grad():
                for traj, (x0, noise, sig, x_t) in zip(batch.chunks, noised):
                    cond = ctx.encode(traj)
                    e_pol = velocity_error(ctx.predict(x_t, sig, cond), x0, noise)
                    with ctx.policy.reference():
                        e_ref = velocity_error(ctx.predict(x_t, sig, cond), x0, noise)
                    d.append((e_pol - e_ref).cpu())
            d_all = all_gather_cat(torch.cat(d)).requires_grad_()
            loss, stats = dpo_pair_loss(d_all, weights, c.beta)
            (coeff,) = torch.autograd.grad(loss, d_all)
            coeff = coeff[rank * n_local : (rank + 1) * n_local].to(ctx.policy.device)
            mb = ctx.cfg.train.micro_batch
            # Pass 2: the same forwards with gradients; the surrogate's value is the pairwise loss and its
            # gradient, summed over micro-steps and ranks, is the pairwise loss's.
            for ci in ctx.chunk_order(len(batch.chunks)):
                traj, (x0, noise, sig, x_t) = batch.chunks[ci], noised[ci]
                e_pol = velocity_error(ctx.predict(x_t, sig, ctx.encode(traj)), x0, noise)
                surrogate = n_micro_global * (coeff[ci * mb : (ci + 1) * mb] * (e_pol - e_pol.detach())).sum()
                ctx.backward(surrogate + loss.detach().to(surrogate.device), dict(stats))
        return {f"train/{k}": v for k, v in agg_stats.items()}

    def after_update(self, policy) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"DPO keeps no state, but the checkpoint's algorithm_state.pt holds {sorted(state)}")
