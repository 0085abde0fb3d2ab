"""DiffusionNFT (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward Process").

Likelihood-free: trains on the clean samples of the rollout with the forward (noising) process, so
any sampler works (the ODE included) and no reverse-process log-prob is recomputed. Each reward
becomes an optimality probability r in [0, 1] from the group-normalised advantage,
``r = 1/2 + 1/2 clip(A / adv_clip, -1, 1)``. With the "old" policy's velocity v_old (an EMA of the
trainable weights, which is also the policy that samples), the current one v_theta and the flow
target v = noise - x0 at x_t = (1 - t) x0 + t noise, the implicit branches are

    v+ = (1 - beta) v_old + beta v_theta        v- = (1 + beta) v_old - beta v_theta

and the loss is ``r ||v+ - v||^2 + (1 - r) ||v- - v||^2`` (divided by beta, so the gradient's scale
does not shrink with beta). Minimising it moves v_theta towards the positive samples' velocity and
away from the negative ones'. With ``adaptive_weighting`` each branch's error is measured on the
clean prediction x0_hat = x_t - t v and divided by its own detached mean absolute error (the
paper's self-normalised x0 regression), which balances noise levels without a hand-made w(t).

The old policy is soft-updated after every iteration, theta_old <- eta_i theta_old + (1 - eta_i) theta
with eta_i = min(ema_ramp * i, ema_max) (i = completed updates): early iterations sample almost
on-policy, later ones from a smoother policy.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from trainer.algorithms.base import AlgorithmConfig, Batch, Context, flow_only_problem
from trainer.algorithms.grpo import check_group_knobs, group_advantages


@dataclass
class NFTConfig(AlgorithmConfig):
    """conf/algorithm/nft.yaml documents each knob."""

    _target_: str = "trainer.algorithms.nft.NFT"
    std_scope: str = "global"  # advantage normaliser Z: "group" (per-prompt std) or "global" (batch std)
    adv_clip: float = 5.0  # r = 1/2 + 1/2 clip(A / adv_clip, -1, 1)
    beta: float = 1.0  # guidance strength of the implicit branches
    timesteps_per_sample: int = 2  # forward-process noise levels trained per sample and inner epoch
    adaptive_weighting: bool = True  # self-normalised x0 regression instead of the plain velocity MSE
    ema_ramp: float = 0.001  # eta_i = min(ema_ramp * i, ema_max): the old policy's decay at update i
    ema_max: float = 0.5


SCHEMAS = {"schema_nft": NFTConfig}


def optimality_probability(adv: torch.Tensor, adv_clip: float) -> torch.Tensor:
    """r = 1/2 + 1/2 clip(A / adv_clip, -1, 1) in [0, 1] from advantages A [N] (already clipped or not)."""
    return 0.5 + 0.5 * torch.clamp(adv / adv_clip, -1.0, 1.0)


def _branch_error(v_branch: torch.Tensor, target: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor,
                  x0: torch.Tensor, adaptive: bool) -> torch.Tensor:
    """Per-sample error [B] of one implicit branch: velocity MSE, or the self-normalised x0 regression."""
    if not adaptive:
        return ((v_branch - target) ** 2).flatten(1).mean(1)
    s = sigma.reshape(-1, *([1] * (x_t.dim() - 1)))
    err = (x_t - s * v_branch - x0).flatten(1)  # x0_hat - x0 = -t (v_branch - target)
    # The weight is a statistic of the error, not a path for gradients; floored so an exact fit does not divide by 0.
    scale = err.detach().abs().mean(1).clamp_min(1e-5)
    return (err**2).mean(1) / scale


def nft_loss(
    v_theta: torch.Tensor, v_old: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
    r: torch.Tensor, beta: float, adaptive: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT's loss on one micro-batch at one noise level per sample.

    Args:
      v_theta [B, *L] (with grad), v_old [B, *L] (the old policy's prediction, no grad): velocities at
        x_t = (1 - sigma) x0 + sigma noise; x0, noise [B, *L]; sigma [B] in (0, 1]; r [B] in [0, 1].
    Returns: (mean over samples of (r * err+ + (1 - r) * err-) / beta, detached stats: pos_err, neg_err,
      old_gap = mean |v_theta - v_old| (0 while the policy equals the old one)).
    """
    v_theta, v_old = v_theta.float(), v_old.float().detach()
    target = (noise - x0).float()
    s = sigma.reshape(-1, *([1] * (x0.dim() - 1))).float()
    x_t = (1 - s) * x0 + s * noise
    pos = _branch_error((1 - beta) * v_old + beta * v_theta, target, x_t, sigma.float(), x0, adaptive)
    neg = _branch_error((1 + beta) * v_old - beta * v_theta, target, x_t, sigma.float(), x0, adaptive)
    loss = ((r * pos + (1 - r) * neg) / beta).mean()
    stats = {"pos_err": pos.mean().detach(), "neg_err": neg.mean().detach(),
             "old_gap": (v_theta - v_old).abs().mean().detach()}
    return loss, stats


def ema_decay(ema_ramp: float, ema_max: float, updates: int) -> float:
    """eta_i = min(ema_ramp * i, ema_max): the old policy keeps this share of itself at update i (0-based)."""
    return min(ema_ramp * updates, ema_max)


class NFT:
    """DiffusionNFT: forward-process training on the rollout's clean samples against an EMA old policy."""

    Config = NFTConfig
    needs_log_probs = False

    def __init__(self, cfg: NFTConfig):
        self.cfg = cfg
        self.ema: dict[str, torch.Tensor] | None = None  # trainable parameter name -> fp32 old-policy weights
        self.updates = 0  # EMA steps taken (i in eta_i)

    @classmethod
    def problems(cls, cfg: NFTConfig, train_cfg, world_size: int) -> list[str]:
        p: list[str] = flow_only_problem(train_cfg, "nft")
        check_group_knobs(cfg, p)
        if cfg.beta <= 0:
            p.append(f"algorithm.beta ({cfg.beta}) must be > 0")
        s = train_cfg.sampler
        steps = s.num_steps - s.start_step  # a partial chain's trajectory holds only its own steps
        if not 1 <= cfg.timesteps_per_sample <= steps:
            p.append(f"algorithm.timesteps_per_sample ({cfg.timesteps_per_sample}) must be in [1, sampler.num_steps "
                     f"({s.num_steps}) - sampler.start_step ({s.start_step})]: noise levels are drawn without "
                     "replacement from the rollout's schedule")
        if cfg.ema_ramp < 0 or not 0 <= cfg.ema_max < 1:
            p.append(f"algorithm.ema_ramp ({cfg.ema_ramp}) must be >= 0 and algorithm.ema_max ({cfg.ema_max}) in [0, 1)")
        if train_cfg.deepspeed.zero_stage == 3:
            p.append("algorithm=nft keeps its old policy as a copy of the trainable weights and swaps it in for the "
                     "rollout, which ZeRO-3's sharded parameters do not allow: use deepspeed=zero2 (or zero0/zero1)")
        return p

    def needs_reference(self) -> bool:
        return False

    def micro_steps(self, n_chunks: int, n_stochastic: int) -> int:
        return n_chunks * self.cfg.timesteps_per_sample

    # ------------------------------------------------------------------ old policy
    @staticmethod
    def _trainable(policy) -> dict[str, torch.nn.Parameter]:
        return {k: p for k, p in policy.transformer.named_parameters() if p.requires_grad}

    def _init_ema(self, policy) -> None:
        params = self._trainable(policy)
        if self.ema is None:  # the first rollout of a fresh run: the old policy is the initial one
            self.ema = {k: p.detach().float().clone() for k, p in params.items()}
        elif self.ema.keys() != params.keys():
            raise ValueError("the checkpoint's NFT old policy does not match this model's trainable weights; was it "
                             "trained with another model.finetune or LoRA shape?")
        # Kept beside the weights (a restored state arrives on the CPU), so the EMA arithmetic runs on the
        # same device in a fresh and in a resumed run.
        self.ema = {k: v.to(params[k].device) for k, v in self.ema.items()}

    @contextlib.contextmanager
    def _old_weights(self, policy):
        """Within this context the trainable weights are the old policy's; restored bit for bit after."""
        self._init_ema(policy)
        params = self._trainable(policy)
        saved = {k: p.detach().clone() for k, p in params.items()}
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(self.ema[k].to(p.device))
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(saved[k])

    def rollout_weights(self, policy):
        return self._old_weights(policy)

    def after_update(self, policy) -> None:
        self._init_ema(policy)
        eta = ema_decay(self.cfg.ema_ramp, self.cfg.ema_max, self.updates)
        with torch.no_grad():
            for k, p in self._trainable(policy).items():
                self.ema[k].mul_(eta).add_(p.detach().float(), alpha=1 - eta)
        self.updates += 1

    # ------------------------------------------------------------------ update
    def update(self, batch: Batch, ctx: Context) -> dict[str, float]:
        c = self.cfg
        adv, agg_stats = group_advantages(batch, ctx, c.std_scope, c.adv_clip)
        r = optimality_probability(adv, c.adv_clip).to(ctx.policy.device)
        mb, k_steps = ctx.cfg.train.micro_batch, c.timesteps_per_sample
        for epoch in range(c.inner_epochs):
            # Noise levels and noise per sample, keyed by its (prompt id, sample index): the same on 1 or
            # N processes. Drawn on the CPU, then moved.
            draws = []
            for traj in batch.chunks:
                idx, noise = [], []
                for pid, sid in zip(traj.prompt_ids.tolist(), traj.sample_ids.tolist()):
                    g = ctx.generator(epoch, pid, sid)
                    idx.append(torch.randperm(traj.sigmas.shape[1] - 1, generator=g)[:k_steps])
                    noise.append(torch.randn((k_steps, *traj.final.shape[1:]), generator=g))
                idx = torch.stack(idx).to(traj.sigmas.device)  # [B, K] indices into sigmas[:-1] (all > 0)
                draws.append((torch.gather(traj.sigmas, 1, idx), torch.stack(noise).to(traj.final.device)))
            # The old policy's predictions, all under one swap of the weights (no gradient).
            v_old = []
            with torch.no_grad(), self._old_weights(ctx.policy):
                for traj, (sig, noise) in zip(batch.chunks, draws):
                    cond = ctx.encode(traj)
                    v_old.append([ctx.predict(_noised(traj.final, noise[:, k], sig[:, k]), sig[:, k], cond)
                                  for k in range(k_steps)])
            for ci in ctx.chunk_order(len(batch.chunks)):
                traj, (sig, noise) = batch.chunks[ci], draws[ci]
                cond = ctx.encode(traj)
                r_c = r[ci * mb : (ci + 1) * mb]
                for k in range(k_steps):
                    x0 = traj.final.float()
                    v_theta = ctx.predict(_noised(x0, noise[:, k], sig[:, k]), sig[:, k], cond)
                    loss, stats = nft_loss(v_theta, v_old[ci][k], x0, noise[:, k].float(), sig[:, k], r_c, c.beta,
                                           c.adaptive_weighting)
                    ctx.backward(loss, stats)
        metrics = {f"train/{k}": v for k, v in agg_stats.items()}
        metrics["train/old_policy_decay"] = ema_decay(c.ema_ramp, c.ema_max, self.updates)
        return metrics

    def state_dict(self) -> dict:
        return {"ema": None if self.ema is None else {k: v.cpu() for k, v in self.ema.items()}, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"ema", "updates"}:
            raise ValueError(f"algorithm_state.pt holds {sorted(state)}, not DiffusionNFT's state (ema, updates); "
                             "was the checkpoint written by another algorithm?")
        self.ema = None if state["ema"] is None else {k: v.float().clone() for k, v in state["ema"].items()}
        self.updates = int(state["updates"])


def _noised(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The forward process x_t = (1 - sigma) x0 + sigma noise, sigma [B]."""
    s = sigma.reshape(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise
