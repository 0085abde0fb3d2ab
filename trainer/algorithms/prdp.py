"""PRDP (Deng et al. 2024, "PRDP: Proximal Reward Difference Prediction for Large-Scale Reward Finetuning of
Diffusion Models"): the policy regresses the reward difference of two samples of the same prompt from the
difference of their log-ratios to the frozen reference, with proximal (clipped) updates per step.

For a trajectory i and trained step t let lr_it = log p_theta(x_{t+1}|x_t) - log p_ref(x_{t+1}|x_t) and
lr_old_it the same under the rollout policy. The paper's objective (eq. 14-21, its appendix G):

    lr_clip_it = clip(lr_it, lr_old_it - eps, lr_old_it + eps)          stepwise proximal clipping
    r_hat_i = mean_t lr_it,   r_clip_i = mean_t lr_clip_it
    l_ij = max((r_hat_i - r_hat_j - (r_i - r_j) / beta)^2, (r_clip_i - r_clip_j - (r_i - r_j) / beta)^2)
    L = mean of l_ij over the ordered pairs of one prompt's samples with r_i > r_j

whose minimiser is the optimum of KL-regularised reward maximisation with KL weight beta. The loss couples
every sample of a group through the squares, so it is not a sum of per-chunk terms: at the start of each
inner epoch the step log-ratios of the whole batch are gathered (groups may span ranks), L and dL/dlr_it
are computed on every rank alike, and each micro-step backpropagates sum_i dL/dlr_it * log p_theta_it for
its chunk and step. The summed gradient is exactly dL/dtheta at the epoch's weights, so one optimizer step
per epoch (the paper's K gradient updates = inner_epochs). Before the first optimizer step log p_theta is
the rollout's log-prob, so epoch 0 needs no extra forward; later epochs recompute it without grad first.
The trained steps are drawn once per epoch for the whole batch, so both samples of a pair are compared on
the same steps. The reward is the ensemble's weighted sum (scored.total), unnormalised.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from trainer.algorithms.base import AlgorithmConfig, Batch, Context
from trainer.algorithms.grpo import n_train_steps
from trainer.distributed import all_gather_cat

WEIGHTED_SUM = "rewards.aggregate.WeightedSum"


@dataclass
class PRDPConfig(AlgorithmConfig):
    """conf/algorithm/prdp.yaml documents each knob."""

    _target_: str = "trainer.algorithms.prdp.PRDP"
    kl_beta: float = 3e-5  # beta: KL weight; the regression target is (r_i - r_j) / beta
    clip_range: float = 1e-4  # eps: stepwise clipping of each step's log-ratio around the rollout policy's
    timestep_fraction: float = 1.0


SCHEMAS = {"schema_prdp": PRDPConfig}


def prdp_loss(
    log_ratio: torch.Tensor, old_log_ratio: torch.Tensor, rewards: torch.Tensor, prompt_ids: torch.Tensor,
    clip_range: float, beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped reward-difference-prediction loss of a batch of groups (module docstring).

    Args:
      log_ratio [N, T]: log p_theta - log p_ref of each trained step (with grad);
      old_log_ratio [N, T]: the same under the rollout policy; rewards [N]; prompt_ids [N] (a group = one id).
    Returns: (loss scalar, stats: rdp_mse (unclipped), clip_frac (share of steps whose log-ratio left the
      clip range), pairs (number of ordered pairs with r_i > r_j) — all detached). Without such a pair
      (every group's rewards tied) the loss is 0 with a zero gradient.
    """
    old = old_log_ratio.detach()
    clipped = torch.clamp(log_ratio, old - clip_range, old + clip_range)
    r_hat, r_clip = log_ratio.mean(1), clipped.mean(1)
    rewards = rewards.to(log_ratio.dtype)
    target = (rewards[:, None] - rewards[None, :]) / beta
    pairs = (prompt_ids[:, None] == prompt_ids[None, :]) & (rewards[:, None] > rewards[None, :])
    mse = (r_hat[:, None] - r_hat[None, :] - target) ** 2
    mse_clip = (r_clip[:, None] - r_clip[None, :] - target) ** 2
    n_pairs = pairs.sum()
    if n_pairs == 0:
        loss = (log_ratio * 0).sum()
        rdp = torch.zeros((), dtype=log_ratio.dtype)
    else:
        loss = torch.maximum(mse, mse_clip)[pairs].mean()
        rdp = mse[pairs].mean()
    stats = {
        "rdp_mse": rdp.detach(),
        "clip_frac": ((log_ratio - old).abs() > clip_range).float().mean().detach(),
        "pairs": n_pairs.float().detach(),
    }
    return loss, stats


class PRDP:
    """Proximal reward difference prediction (module docstring)."""

    Config = PRDPConfig
    needs_log_probs = True

    def __init__(self, cfg: PRDPConfig):
        self.cfg = cfg

    @classmethod
    def problems(cls, cfg: PRDPConfig, train_cfg, world_size: int) -> list[str]:
        p: list[str] = []
        if cfg.kl_beta <= 0:
            p.append(f"algorithm.kl_beta ({cfg.kl_beta}) must be > 0: PRDP regresses (r_i - r_j) / kl_beta")
        if cfg.clip_range <= 0:
            p.append(f"algorithm.clip_range ({cfg.clip_range}) must be > 0")
        if not 0 < cfg.timestep_fraction <= 1:
            p.append(f"algorithm.timestep_fraction ({cfg.timestep_fraction}) must be in (0, 1]")
        if cfg.optimizer_steps_per_epoch != 1:
            p.append(f"algorithm.optimizer_steps_per_epoch ({cfg.optimizer_steps_per_epoch}) must be 1 for algorithm=prdp: "
                     "its loss couples every pair of a group, so each update uses the whole batch; use "
                     "algorithm.inner_epochs for the paper's K updates per rollout")
        agg = train_cfg.aggregate
        target = agg.get("_target_") if isinstance(agg, dict) else getattr(agg, "_target_", None)
        if target != WEIGHTED_SUM:
            p.append(f"aggregate ({target}) is not read by algorithm=prdp: it regresses differences of the weighted "
                     "sum of the rewards; use aggregate=weighted_sum")
        return p

    def needs_reference(self) -> bool:
        return True

    def micro_steps(self, n_chunks: int, n_stochastic: int) -> int:
        return n_chunks * n_train_steps(self.cfg.timestep_fraction, n_stochastic)

    def rollout_weights(self, policy):
        return nullcontext()

    def update(self, batch: Batch, ctx: Context) -> dict[str, float]:
        c = self.cfg
        mb = ctx.cfg.train.micro_batch
        n_chunks = len(batch.chunks)
        rewards = all_gather_cat(batch.scored.total.float().cpu().reshape(-1))
        pids = all_gather_cat(batch.prompt_ids.cpu())
        conds = [ctx.encode(traj) for traj in batch.chunks]
        stochastic = batch.chunks[0].stochastic[0].nonzero().flatten()
        n_train = n_train_steps(c.timestep_fraction, len(stochastic))
        ref: dict[tuple[int, int], torch.Tensor] = {}  # (chunk, step) -> reference log-prob [mb], reused by epochs
        n_local = len(batch.prompt_ids)
        rank = ctx.world.rank
        # DeepSpeed divides each micro-step's loss by the accumulation count and averages gradients over
        # ranks: scaling the surrogate by both makes the step's gradient exactly dL/dtheta.
        scale = float(n_chunks * n_train * ctx.world.world_size)
        epoch_stats: dict[str, list[float]] = {}
        for epoch in range(c.inner_epochs):
            # The same steps for every chunk and rank (drawn from the iteration's shared stream), so the two
            # samples of a pair are always compared on the same steps.
            g = ctx.generator(epoch, 2)
            steps = sorted(stochastic[torch.randperm(len(stochastic), generator=g)[:n_train]].tolist())
            lp_ref = torch.empty(n_local, n_train)
            lp_cur = torch.empty(n_local, n_train)
            lp_old = torch.empty(n_local, n_train)
            for ci, traj in enumerate(batch.chunks):
                rows = slice(ci * mb, (ci + 1) * mb)
                for t, j in enumerate(steps):
                    if (ci, j) not in ref:
                        with torch.no_grad(), ctx.policy.reference():
                            ref[(ci, j)] = ctx.sampler.log_prob(ctx.predict, traj, j, conds[ci])[0].float().cpu()
                    lp_ref[rows, t] = ref[(ci, j)]
                    lp_old[rows, t] = traj.log_probs[:, j].float().cpu()
                    if epoch == 0:  # no optimizer step yet: the policy is the rollout's, bit for bit
                        lp_cur[rows, t] = lp_old[rows, t]
                    else:
                        with torch.no_grad():
                            lp_cur[rows, t] = ctx.sampler.log_prob(ctx.predict, traj, j, conds[ci])[0].float().cpu()
            log_ratio = all_gather_cat(lp_cur - lp_ref).requires_grad_()
            old_log_ratio = all_gather_cat(lp_old - lp_ref)
            loss, stats = prdp_loss(log_ratio, old_log_ratio, rewards, pids, c.clip_range, c.kl_beta)
            (coef,) = torch.autograd.grad(loss, log_ratio)
            coef = coef[rank * n_local : (rank + 1) * n_local].to(ctx.policy.device)
            for k, v in stats.items():
                epoch_stats.setdefault(k, []).append(float(v))
            for ci in ctx.chunk_order(n_chunks):
                traj = batch.chunks[ci]
                for t, j in enumerate(steps):
                    log_prob, _, _ = ctx.sampler.log_prob(ctx.predict, traj, j, conds[ci])
                    surrogate = scale * (coef[ci * mb : (ci + 1) * mb, t] * log_prob).sum()
                    # Its value is the batch's PRDP loss (what gets logged), its gradient the surrogate's.
                    micro_loss = surrogate - surrogate.detach() + loss.detach().to(surrogate.device)
                    on_policy = (log_prob - traj.log_probs[:, j]).abs().max().detach()
                    ctx.backward(micro_loss, {"log_ratio_abs_max": on_policy})
        return {f"train/{k}": sum(v) / len(v) for k, v in epoch_stats.items()}

    def after_update(self, policy) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"PRDP keeps no state, but the checkpoint's algorithm_state.pt holds {sorted(state)}")
