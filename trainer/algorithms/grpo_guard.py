"""GRPO-Guard (Wang et al. 2025, "GRPO-Guard: Mitigating Implicit Over-Optimization in Flow Matching via
Regulated Clipping"): Flow-GRPO with the importance ratio normalised per step (RatioNorm) and the step's
loss reweighted by 1 / |dt|.

Why: a stochastic step is Gaussian, x' = mu_old + s * eps with s the step's std. Under the current policy
(mean mu), the mean-reduced log-ratio is

    log r = mean(eps * (mu - mu_old)) / s  -  mean((mu - mu_old)^2) / (2 s^2)

whose expectation is negative (the second term) and whose spread scales with 1 / s, so a fixed clip range
binds differently at every step and rarely for positive advantages. RatioNorm adds the bias back and
multiplies by s:

    b = reduce((mu - mu_old)^2) / (2 s^2)                     (reduce = the sampler's log-prob reduction)
    log r_norm = (log r + b) * s = reduce(eps * (mu - mu_old)),  ratio = exp(log r_norm)

and the clipped-ratio loss of the step is divided by |dt| = sigma_j - sigma_{j+1}, which equalises the
gradient across noise levels (for flow kernels mu - mu_old is proportional to dt). KL to the reference as
in Flow-GRPO. mu_old is the rollout's mean, rebuilt from the trajectory: the stored clean prediction x0_hat
gives back the rollout model's output (velocity or epsilon) exactly up to rounding, and the sampler's own
transition turns it into the mean (no second forward pass, no extra storage).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from samplers.trajectory import Trajectory
from trainer.algorithms.base import Batch, Context
from trainer.algorithms.grpo import GRPO, GRPOConfig, group_advantages, n_train_steps, ratio_updates


@dataclass
class GRPOGuardConfig(GRPOConfig):
    """conf/algorithm/grpo_guard.yaml documents each knob."""

    _target_: str = "trainer.algorithms.grpo_guard.GRPOGuard"
    step_reweight: bool = True  # divide each step's policy loss by |dt| (the paper's gradient reweighting)


SCHEMAS = {"schema_grpo_guard": GRPOGuardConfig}


def rollout_output(kernel, x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The model output that gave the clean prediction ``x0`` at state ``x`` [B, *L], noise level sigma [B].

    Inverts ``kernel.clean``: the state is x = alpha * x0 + s * noise; epsilon kernels predict the noise,
    velocity (rectified-flow) kernels predict noise - x0 with alpha = 1 - s, so x - x0 = s * v.
    """
    alpha, s = kernel.alpha_sigma(sigma.float())
    shape = (-1,) + (1,) * (x.dim() - 1)
    if kernel.prediction == "velocity":
        return (x - x0) / s.reshape(shape)
    if kernel.prediction == "epsilon":
        return (x - alpha.reshape(shape) * x0) / s.reshape(shape)
    raise ValueError(f"cannot invert the clean prediction of a kernel predicting {kernel.prediction!r}")


def rollout_mean(sampler, traj: Trajectory, j: int) -> torch.Tensor:
    """[B, *L] the rollout policy's transition mean of stochastic step j, from the stored x0_hat."""
    out = rollout_output(sampler.kernel, traj.latents[:, j], traj.pred_x0[:, j], traj.sigmas[:, j])
    _, mean, _ = sampler.log_prob(lambda x, sigma, cond: out, traj, j, None)
    return mean


def guard_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float,
    mean: torch.Tensor, old_mean: torch.Tensor, std: torch.Tensor, dt: torch.Tensor | None, reduction: str = "mean",
    ref_mean: torch.Tensor | None = None, kl_beta: float = 0.0, kl_std: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RatioNorm clipped-ratio loss of one step (module docstring), plus beta * KL to the reference.

    Args:
      log_prob [B] (with grad), old_log_prob [B] (rollout), advantages [B].
      mean [B, *L] (with grad), old_mean [B, *L] (rollout), std [B]: the step's transition std s.
      dt [B]: |sigma_j - sigma_{j+1}| (> 0); None skips the 1/|dt| reweighting.
      reduction: how the log-prob reduces over elements ("mean" or "sum"); the bias must match it.
      ref_mean [B, *L]: the reference's mean, needed when kl_beta > 0 (KL as in grpo_loss).
    Returns: (loss, stats: pg_loss, kl, clip_frac, ratio_bias (mean b), log_ratio_abs_max (raw, the
      on-policy check)).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"sampler.log_prob_reduction must be 'mean' or 'sum', got {reduction!r}")
    sq = (mean - old_mean).pow(2).flatten(1)
    bias = (sq.mean(1) if reduction == "mean" else sq.sum(1)) / (2 * std**2)
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp((log_ratio + bias) * std)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_sample = torch.maximum(unclipped, clipped)
    if dt is not None:
        per_sample = per_sample / dt
    pg_loss = per_sample.mean()
    kl = torch.zeros((), device=log_prob.device)
    if kl_beta > 0:
        scale = std if kl_std is None else kl_std  # the KL's scale (algorithm.kl_convention), as in grpo_loss
        kl = (((mean - ref_mean) ** 2).flatten(1).mean(1) / (2 * scale**2)).mean()
    stats = {
        "pg_loss": pg_loss.detach(),
        "kl": kl.detach(),
        "clip_frac": ((ratio - 1).abs() > clip_range).float().mean().detach(),
        "ratio_bias": bias.mean().detach(),
        "log_ratio_abs_max": log_ratio.abs().max().detach(),
    }
    return pg_loss + kl_beta * kl, stats


class GRPOGuard:
    """Flow-GRPO's update with RatioNorm and 1/|dt| step reweighting (module docstring)."""

    Config = GRPOGuardConfig
    needs_log_probs = True

    def __init__(self, cfg: GRPOGuardConfig):
        self.cfg = cfg

    @classmethod
    def problems(cls, cfg: GRPOGuardConfig, train_cfg, world_size: int) -> list[str]:
        p = GRPO.problems(cfg, train_cfg, world_size)
        reduction = getattr(train_cfg.sampler, "log_prob_reduction", "mean")
        if reduction not in ("mean", "sum"):
            p.append(f"sampler.log_prob_reduction ({reduction!r}) must be 'mean' or 'sum' for algorithm=grpo_guard")
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
        sampler = ctx.sampler

        def step_loss(log_prob, old_log_prob, a, mean, ref_mean, std, j, traj):
            with torch.no_grad():
                old_mean = rollout_mean(sampler, traj, j)
            dt = (traj.sigmas[:, j] - traj.sigmas[:, j + 1]).float() if c.step_reweight else None
            return guard_loss(log_prob, old_log_prob, a, c.clip_range, mean, old_mean, std, dt,
                              sampler.log_prob_reduction, ref_mean, c.kl_beta, sampler.kl_std(traj, j, std, c.kl_convention))

        ratio_updates(batch, ctx, adv, c.inner_epochs, c.timestep_fraction, c.kl_beta, step_loss, c.timestep_selection)
        return {f"train/{k}": v for k, v in agg_stats.items()}

    def after_update(self, policy) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"GRPO-Guard keeps no state, but the checkpoint's algorithm_state.pt holds {sorted(state)}")
