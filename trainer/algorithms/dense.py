"""Dense per-step credit for the GRPO family: each trained stochastic step gets its own advantage.

Three methods share Flow-GRPO's clipped-ratio update (trainer/algorithms/grpo.py::ratio_updates, fed
[N_local, S] advantages) and differ only in how a step's reward is measured:

  DenseGRPO (Deng et al. 2026, "DenseGRPO: From Sparse to Dense Reward for Flow Matching Model
  Alignment"): V_k = R(decode(complete(x_k))), the reward of the clean image the chain reaches from
  the latent x_k; step j's dense reward is the gain V_{j+1} - V_j; advantages are group-normalised per step.
  TP-GRPO (Tong et al. 2026, "Alleviating Sparse Rewards by Modeling Step-Wise and Long-Term Sampling
  Effects in Flow-Based GRPO"): the same increments, except at turning points, which get the
  aggregated long-term reward V_S - V_j (see ``turning_point_rewards``).
  Dual-reward GRPO (Euphonium, Zhong et al. 2026, "Steering Video Flow Matching via Process Reward
  Gradient Guided Stochastic Dynamics"): a differentiable latent process reward P gives each step's
  credit (its gain P(x0_hat_{j+1}) - P(x0_hat_j)), the pixel outcome reward (the ensemble) gives the
  sample's advantage; the two advantages are mixed with a weight.

``complete`` is ``ode`` (the paper's: run the remaining steps deterministically with the current
policy, the kernel's noise-free first-order step, no reward guidance) or ``one_step`` (the clean
prediction x0_hat_k = traj.pred_x0[:, k] the rollout already holds; no extra model calls). V_S is the
sample's own reward (batch.scored.total). Everything is computed with the rollout's weights, before
the first optimizer step, and its wall time is logged as time/dense_rewards (all ranks' maximum).
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Optional

import torch
from hydra.utils import instantiate

from trainer.advantages import group_advantages as group_relative
from trainer.algorithms.base import Batch, Context
from trainer.algorithms.grpo import GRPO, GRPOConfig, group_advantages, grpo_loss, n_train_steps, ratio_updates
from trainer.distributed import all_gather_cat, all_reduce_max

COMPLETIONS = ("ode", "one_step")


@dataclass
class DenseGRPOConfig(GRPOConfig):
    """conf/algorithm/dense_grpo.yaml documents each knob."""

    _target_: str = "trainer.algorithms.dense.DenseGRPO"
    completion: str = "ode"  # how a latent becomes the clean image that is scored: "ode" | "one_step"


@dataclass
class TPGRPOConfig(GRPOConfig):
    """conf/algorithm/tp_grpo.yaml documents each knob."""

    _target_: str = "trainer.algorithms.dense.TPGRPO"
    completion: str = "ode"
    balance_turning_points: bool = True  # keep as many rising as falling turning points (largest |reward| first)


@dataclass
class DualGRPOConfig(GRPOConfig):
    """conf/algorithm/dual_grpo.yaml documents each knob."""

    _target_: str = "trainer.algorithms.dense.DualGRPO"
    process_reward: Optional[Any] = None  # {_target_: ...} latent reward (x0_hat, sigma, prompt_ids) -> [B]; null: sampler.reward_guidance
    process_weight: float = 0.5  # advantage = (1 - w) * outcome + w * process


SCHEMAS = {"schema_dense_grpo": DenseGRPOConfig, "schema_tp_grpo": TPGRPOConfig, "schema_dual_grpo": DualGRPOConfig}


# ----------------------------------------------------------------------------- clean images of latents
@torch.no_grad()
def ode_complete(predict, kernel, x: torch.Tensor, sigmas: torch.Tensor, start: int, cond: object) -> torch.Tensor:
    """The end of the deterministic chain from ``x`` [B, *L] at sigmas[:, start] (sigmas [B, S+1]):
    S - start noise-free kernel steps (Euler for flow matching) with ``predict``. start = S returns x."""
    x = x.float()
    for k in range(start, sigmas.shape[1] - 1):
        out = predict(x, sigmas[:, k], cond).float()
        x = kernel.transition(x, out, sigmas, k, 0.0)[0]
    return x


def scored_steps(stochastic: torch.Tensor) -> list[int]:
    """Chain positions whose clean image is scored: every stochastic step j and its successor j + 1."""
    steps = stochastic.nonzero().flatten().tolist()
    return sorted({*steps, *(j + 1 for j in steps)})


@torch.no_grad()
def clean_values(batch: Batch, ctx: Context, completion: str) -> torch.Tensor:
    """[N_local, S+1] reward of the clean image reached from each latent x_k, NaN where not needed.

    Column S is the sample's own reward (batch.scored.total); every other scored position k costs a
    decode and a reward call per sample, plus S - k policy forwards per sample with ``ode``.
    """
    if completion not in COMPLETIONS:
        raise ValueError(f"completion must be one of {COMPLETIONS}, got {completion!r}")
    first = batch.chunks[0]
    S = first.stochastic.shape[1]
    values = torch.full((len(batch.prompt_ids), S + 1), float("nan"))
    values[:, S] = batch.scored.total.float().cpu()
    conds = [ctx.encode(traj) for traj in batch.chunks] if completion == "ode" else None
    for k in scored_steps(first.stochastic[0]):
        if k == S:
            continue
        images = []
        for ci, traj in enumerate(batch.chunks):
            if completion == "ode":
                clean = ode_complete(ctx.predict, ctx.sampler.kernel, traj.latents[:, k], traj.sigmas, k, conds[ci])
            else:
                clean = traj.pred_x0[:, k]
            images.append(ctx.policy.decode(clean).cpu())
        values[:, k] = ctx.rewards(torch.cat(images), batch.prompts, batch.meta).total.float().cpu()
    return values


# ----------------------------------------------------------------------------------- advantages
def step_gains(values: torch.Tensor, stochastic: torch.Tensor) -> torch.Tensor:
    """[N, S] gain values[:, j+1] - values[:, j] on stochastic steps j (stochastic [S] bool), NaN elsewhere."""
    gains = values[:, 1:] - values[:, :-1]
    return torch.where(stochastic.cpu().unsqueeze(0), gains, torch.full_like(gains, float("nan")))


def stepwise_advantages(step_rewards: torch.Tensor, prompt_ids: torch.Tensor, std_scope: str, adv_clip: float) -> torch.Tensor:
    """[N, S] per-step group-relative advantages of [N, S] step rewards (NaN = step not trained -> 0).

    Each column is normalised on its own: (r_ij - mean of r_.j over i's prompt group) / std, the std
    per group or over the batch (``std_scope``, as GRPO's), then clipped to [-adv_clip, adv_clip].
    """
    adv = torch.zeros_like(step_rewards, dtype=torch.float32)
    for j in range(step_rewards.shape[1]):
        col = step_rewards[:, j]
        if torch.isnan(col).all():
            continue
        adv[:, j] = group_relative(col, prompt_ids, std_scope)
    return adv.clamp(-adv_clip, adv_clip)


def turning_point_rewards(values: torch.Tensor, stochastic: torch.Tensor, balance: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """TP-GRPO's step rewards from the clean-image rewards ``values`` [N, S+1] (columns at the stochastic
    steps j_1 < ... < j_n and their successors, and column S, the sample's reward).

    With d_k = V_{j_k+1} - V_{j_k} (step k's increment), the overall trend D = V_S - V_{j_1} and the
    aggregated long-term reward L_k = V_S - V_{j_k} (what the sample gained from before step k to the end):
      step 1 is a turning point when sign(d_1) = sign(V_S - V_{j_1+1}) != 0: what follows continues its move;
      step k > 1 when sign(d_{k-1}) = -sign(D) and sign(d_k) = sign(D) (it flips the local trend back to the
        overall one) and sign(V_S - V_{j_k+1}) = sign(d_k) (what follows continues it).
    Turning points get L_k instead of d_k (sign(L_k) = sign(D) at every turning point). ``balance``: when the
    batch has turning points of both signs, only min(#rising, #falling) of each sign stay turning points, those
    of the samples with the largest |D| (as the authors' released code ranks them; ties: lower flat index
    first); the others get d_k again.
    Returns (rewards [N, S], NaN off the stochastic steps; turning-point mask [N, S] bool).
    """
    S = values.shape[1] - 1
    steps = stochastic.cpu().nonzero().flatten()
    final = values[:, S : S + 1]
    before, after = values[:, steps], values[:, steps + 1]
    d = after - before
    trend = torch.sign(final - before[:, :1])
    agg = final - before
    agreeing = torch.sign(d) * trend  # > 0: step goes the overall way, < 0: against it
    continued = torch.sign(d) * torch.sign(final - after) > 0
    turning = continued.clone()
    turning[:, 1:] &= (agreeing[:, :-1] < 0) & (agreeing[:, 1:] > 0)
    if balance:
        turning = _balanced(turning, (final - before[:, :1]).expand_as(agg))
    rewards = torch.full((values.shape[0], S), float("nan"))
    mask = torch.zeros(values.shape[0], S, dtype=torch.bool)
    rewards[:, steps] = torch.where(turning, agg, d)
    mask[:, steps] = turning
    return rewards, mask


def _balanced(turning: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Keep min(#positive, #negative) turning points of each sign of ``score``, largest |score| first."""
    flat, vals = turning.flatten(), score.flatten()
    pos = (flat & (vals > 0)).nonzero().flatten()
    neg = (flat & (vals < 0)).nonzero().flatten()
    if len(pos) == 0 or len(neg) == 0:
        return turning  # one-sided: nothing to balance against (kept as they are)
    keep = min(len(pos), len(neg))
    out = torch.zeros_like(flat)
    for idx in (pos, neg):
        order = torch.sort(vals[idx].abs(), descending=True, stable=True).indices[:keep]
        out[idx[order]] = True
    return out.reshape(turning.shape)


def mixed_advantages(outcome: torch.Tensor, process: torch.Tensor, weight: float, adv_clip: float) -> torch.Tensor:
    """Dual-reward advantage [N, S]: (1 - weight) * outcome [N] (every step) + weight * process [N, S], clipped."""
    return ((1.0 - weight) * outcome.unsqueeze(1) + weight * process).clamp(-adv_clip, adv_clip)


# -------------------------------------------------------------------------------- shared plumbing
def _global(local: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's rows of ``local`` [N_local, ...] and their prompt ids, in global sample order."""
    return all_gather_cat(local.float().cpu().contiguous()), all_gather_cat(batch.prompt_ids.cpu())


def _own(global_rows: torch.Tensor, ctx: Context, n_local: int) -> torch.Tensor:
    r = ctx.world.rank
    return global_rows[r * n_local : (r + 1) * n_local]


def _slowest(seconds: float) -> float:
    """The slowest rank's seconds: the same number on every rank (update() returns global metrics)."""
    return float(all_reduce_max(torch.tensor([seconds], dtype=torch.float64))[0])


def _ratio_update(cfg, batch: Batch, ctx: Context, adv: torch.Tensor) -> None:
    def step_loss(log_prob, old_log_prob, a, mean, ref_mean, std, j, traj):
        kl_std = ctx.sampler.kl_std(traj, j, std, cfg.kl_convention)
        return grpo_loss(log_prob, old_log_prob, a, cfg.clip_range, mean, ref_mean, kl_std, cfg.kl_beta)

    ratio_updates(batch, ctx, adv, cfg.inner_epochs, cfg.timestep_fraction, cfg.kl_beta, step_loss, cfg.timestep_selection)


def _dense_reward_problems(cfg, train_cfg) -> list[str]:
    """Rules of the clean-image rewards (DenseGRPO, TP-GRPO): a known completion, and the ensemble's weighted
    total as the reward, so another aggregation (which these step rewards would not read) is an error."""
    p = []
    if cfg.completion not in COMPLETIONS:
        p.append(f"algorithm.completion ({cfg.completion!r}) must be one of {list(COMPLETIONS)}")
    target = (train_cfg.aggregate or {}).get("_target_")
    if target != "rewards.aggregate.WeightedSum":
        p.append(f"aggregate ({target}) is not read by algorithm={type(cfg).__name__.removesuffix('Config')}: its step "
                 "rewards are the ensemble's weighted total of each clean image; use aggregate=weighted_sum")
    return p


def _no_state(name: str, state: dict) -> None:
    if state:
        raise ValueError(f"{name} keeps no state, but the checkpoint's algorithm_state.pt holds {sorted(state)}")


# ------------------------------------------------------------------------------------ algorithms
class DenseGRPO:
    """DenseGRPO: per-step advantages from the reward gain of each stochastic step's clean image."""

    Config = DenseGRPOConfig
    needs_log_probs = True

    def __init__(self, cfg: DenseGRPOConfig):
        self.cfg = cfg

    @classmethod
    def problems(cls, cfg: DenseGRPOConfig, train_cfg, world_size: int) -> list[str]:
        return GRPO.problems(cfg, train_cfg, world_size) + _dense_reward_problems(cfg, train_cfg)

    def needs_reference(self) -> bool:
        return self.cfg.kl_beta > 0

    def micro_steps(self, n_chunks: int, n_stochastic: int) -> int:
        return n_chunks * n_train_steps(self.cfg.timestep_fraction, n_stochastic, self.cfg.timestep_selection)

    def rollout_weights(self, policy):
        return nullcontext()

    def update(self, batch: Batch, ctx: Context) -> dict[str, float]:
        c = self.cfg
        t0 = time.time()
        values = clean_values(batch, ctx, c.completion)
        seconds = time.time() - t0
        all_values, all_pids = _global(values, batch)
        gains = step_gains(all_values, batch.chunks[0].stochastic[0])
        adv = stepwise_advantages(gains, all_pids, c.std_scope, c.adv_clip)
        _ratio_update(c, batch, ctx, _own(adv, ctx, len(batch.prompt_ids)))
        return {
            "time/dense_rewards": _slowest(seconds),
            # How far the clean-image reward moves per step: the signal the per-step advantages normalise.
            "train/dense_gain_abs_mean": float(gains.abs().nanmean()),
        }

    def after_update(self, policy) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        _no_state("DenseGRPO", state)


class TPGRPO:
    """TurningPoint-GRPO: per-step increments, turning points credited with the long-term reward."""

    Config = TPGRPOConfig
    needs_log_probs = True

    def __init__(self, cfg: TPGRPOConfig):
        self.cfg = cfg

    @classmethod
    def problems(cls, cfg: TPGRPOConfig, train_cfg, world_size: int) -> list[str]:
        return GRPO.problems(cfg, train_cfg, world_size) + _dense_reward_problems(cfg, train_cfg)

    def needs_reference(self) -> bool:
        return self.cfg.kl_beta > 0

    def micro_steps(self, n_chunks: int, n_stochastic: int) -> int:
        return n_chunks * n_train_steps(self.cfg.timestep_fraction, n_stochastic, self.cfg.timestep_selection)

    def rollout_weights(self, policy):
        return nullcontext()

    def update(self, batch: Batch, ctx: Context) -> dict[str, float]:
        c = self.cfg
        t0 = time.time()
        values = clean_values(batch, ctx, c.completion)
        seconds = time.time() - t0
        all_values, all_pids = _global(values, batch)
        stochastic = batch.chunks[0].stochastic[0]
        # Computed on the gathered batch by every rank alike: the balancing compares all samples.
        rewards, turning = turning_point_rewards(all_values, stochastic, c.balance_turning_points)
        adv = stepwise_advantages(rewards, all_pids, c.std_scope, c.adv_clip)
        _ratio_update(c, batch, ctx, _own(adv, ctx, len(batch.prompt_ids)))
        return {
            "time/dense_rewards": _slowest(seconds),
            "train/turning_point_frac": float(turning[:, stochastic.cpu()].float().mean()),
        }

    def after_update(self, policy) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        _no_state("TPGRPO", state)


class DualGRPO:
    """Dual-reward GRPO: latent process-reward gains per step, mixed with the pixel outcome advantage."""

    Config = DualGRPOConfig
    needs_log_probs = True

    def __init__(self, cfg: DualGRPOConfig):
        self.cfg = cfg
        # Built once; null means the sampler's guidance reward, which is only known at update time.
        self._process = instantiate(cfg.process_reward) if cfg.process_reward is not None else None

    @classmethod
    def problems(cls, cfg: DualGRPOConfig, train_cfg, world_size: int) -> list[str]:
        p = GRPO.problems(cfg, train_cfg, world_size)
        if not 0 < cfg.process_weight <= 1:
            p.append(f"algorithm.process_weight ({cfg.process_weight}) must be in (0, 1]: 0 is plain GRPO (use "
                     "algorithm=grpo), 1 trains on the process reward alone")
        if cfg.process_reward is None and getattr(train_cfg.sampler, "reward_guidance", None) is None:
            p.append("algorithm.process_reward is null, which means sampler.reward_guidance, but that is null too: set "
                     "one of them to a latent reward, e.g. {_target_: samplers.guidance.LatentTarget, target: 1.0}")
        if cfg.process_reward is not None and not (isinstance(cfg.process_reward, dict) and "_target_" in cfg.process_reward):
            p.append(f"algorithm.process_reward needs a _target_ (got {cfg.process_reward!r})")
        return p

    def needs_reference(self) -> bool:
        return self.cfg.kl_beta > 0

    def micro_steps(self, n_chunks: int, n_stochastic: int) -> int:
        return n_chunks * n_train_steps(self.cfg.timestep_fraction, n_stochastic, self.cfg.timestep_selection)

    def rollout_weights(self, policy):
        return nullcontext()

    def update(self, batch: Batch, ctx: Context) -> dict[str, float]:
        c = self.cfg
        process = self._process if self._process is not None else ctx.sampler.reward_guidance
        if hasattr(process, "bind"):  # a prompt-aware or decoding process reward: the run's policy and prompts
            process.bind(ctx.policy, ctx.prompts)
        t0 = time.time()
        values = process_values(batch, process)
        seconds = time.time() - t0
        all_values, all_pids = _global(values, batch)
        stochastic = batch.chunks[0].stochastic[0]
        process_adv = stepwise_advantages(step_gains(all_values, stochastic), all_pids, c.std_scope, c.adv_clip)
        outcome_adv, agg_stats = group_advantages(batch, ctx, c.std_scope, c.adv_clip)
        adv = mixed_advantages(outcome_adv.float().cpu(), _own(process_adv, ctx, len(batch.prompt_ids)), c.process_weight,
                               c.adv_clip)
        _ratio_update(c, batch, ctx, adv)
        return {"time/dense_rewards": _slowest(seconds), **{f"train/{k}": v for k, v in agg_stats.items()}}

    def after_update(self, policy) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        _no_state("DualGRPO", state)


@torch.no_grad()
def process_values(batch: Batch, process) -> torch.Tensor:
    """[N_local, S+1] process reward of each step's clean latent: P(x0_hat_k, sigma_k) for k < S (the
    rollout's one-step clean predictions) and P(x_S, sigma_S) for the sample; no decode, no reward call."""
    rows = []
    for traj in batch.chunks:
        S = traj.stochastic.shape[1]
        clean = torch.cat([traj.pred_x0, traj.latents[:, -1:]], 1)  # [B, S+1, *L]
        rows.append(torch.stack([process(clean[:, k].float(), traj.sigmas[:, k], traj.prompt_ids).float()
                                 for k in range(S + 1)], 1).cpu())
    return torch.cat(rows)
