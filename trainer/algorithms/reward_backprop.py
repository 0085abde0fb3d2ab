"""Reward backpropagation: DRaFT-K (Clark et al. 2024, "Directly Fine-Tuning Diffusion Models on
Differentiable Rewards") and AlignProp (Prabhudesai et al. 2023, "Aligning Text-to-Image Diffusion
Models with Reward Backpropagation").

The rollout already stored every latent x_0..x_S of each chunk. The update re-runs only the last K
steps, from the stored x_{S-K}, with gradients; the first S-K steps stay without them (DRaFT-K; with
``truncation: random`` K is drawn anew each iteration, AlignProp's randomized truncation). The
re-run sample is decoded and the loss is

    loss = -loss_scale * mean_b sum_i w_i R_i(decode(x_S)_b)

over the trained rewards (weight != 0), each of which must be differentiable in the pixels. The
re-run follows the rollout's path: deterministic steps use the sampler's own arithmetic (an ODE
rollout is reproduced exactly), stochastic steps reuse the rollout's noise, recovered from the
stored latents as eps_j = (x_{j+1} - mean_j) / std_j before any optimizer step of the iteration.
Each re-run step can be wrapped in torch.utils.checkpoint (``checkpointing``), so the memory of K
steps is K latents plus one step's activations. No log-probs, no reference policy, no advantages.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from hydra.utils import get_class
from torch.utils.checkpoint import checkpoint

from samplers.base import per_sample
from samplers.chain import ChainSampler
from samplers.trajectory import Trajectory
from trainer.algorithms.base import AlgorithmConfig, Batch, Context

TRUNCATIONS = ("fixed", "random")
WEIGHTED_SUM = "rewards.aggregate.WeightedSum"
# Key of the truncation draw in the iteration's training stream: two parts, a length no other draw
# uses (the chunk order is keyed by (rank,), GRPO's step subsets by (epoch, chunk, 1)).
TRUNCATION_KEY = (0, 2)


@dataclass
class RewardBackpropConfig(AlgorithmConfig):
    """conf/algorithm/reward_backprop.yaml documents each knob."""

    _target_: str = "trainer.algorithms.reward_backprop.RewardBackprop"
    last_k: int = 1  # K: the last K sampling steps are re-run with gradients (the largest K with truncation=random)
    truncation: str = "fixed"  # "fixed": K = last_k (DRaFT-K); "random": K ~ U{1..last_k} per iteration (AlignProp)
    checkpointing: bool = True  # recompute each re-run step's activations in backward (torch.utils.checkpoint)
    loss_scale: float = 1.0  # the loss is -loss_scale * the mean weighted reward


SCHEMAS = {"schema_reward_backprop": RewardBackpropConfig}


def _target_of(spec) -> str | None:
    return spec.get("_target_") if hasattr(spec, "get") else None


def nondifferentiable_rewards(reward_specs: dict) -> list[str]:
    """Problems for every trained reward (weight != 0) whose class does not declare ``differentiable``.

    reward_specs: name -> {_target_, weight, ...} (the config's ``rewards``). A class that cannot be
    imported is skipped here (trainer/config.validate reports it).
    """
    p = []
    for name, spec in reward_specs.items():
        if not hasattr(spec, "get") or spec.get("weight", 1.0) == 0 or _target_of(spec) is None:
            continue
        try:
            cls = get_class(spec["_target_"])
        except Exception:  # noqa: BLE001 - an unimportable reward is reported elsewhere
            continue
        if not getattr(cls, "differentiable", False):
            p.append(
                f"rewards.{name} ({spec['_target_']}) is not differentiable, but algorithm=reward_backprop trains on "
                f"the gradient of every trained reward: set rewards.{name}.weight=0 to keep it as a monitor, or "
                "train it with a policy-gradient algorithm (algorithm=grpo)"
            )
    return p


def trained_rewards(ensemble) -> list[tuple[str, float, Callable]]:
    """(name, weight, reward) of every trained reward of a RewardEnsemble, in its order.

    Raises ValueError naming any trained reward that is not differentiable (the config check of
    ``problems`` catches it earlier when the rewards come from a config).
    """
    out, bad = [], []
    for name, reward in ensemble.rewards.items():
        weight = ensemble.weights[name]
        if weight == 0:
            continue  # a monitor: scored by the rollout, not trained on
        if not getattr(reward, "differentiable", False):
            bad.append(name)
        out.append((name, weight, reward))
    if bad:
        raise ValueError(f"rewards {bad} are trained (weight != 0) but not differentiable, which "
                         "algorithm=reward_backprop needs: set their weight to 0 or use algorithm=grpo")
    return out


def weighted_reward(
    rewards: list[tuple[str, float, Callable]], images: torch.Tensor, prompts: list[str], meta: list[dict]
) -> torch.Tensor:
    """sum_i w_i R_i(images) [B] with gradients to ``images`` [B, 3, H, W].

    The rewards are called directly: RewardEnsemble detaches the images.
    """
    total = None
    for name, weight, reward in rewards:
        out = reward(images, prompts, meta)
        r = (out["reward"] if isinstance(out, dict) else out).float().reshape(-1)
        if r.shape[0] != len(prompts):
            raise RuntimeError(f"reward {name!r} returned {r.shape[0]} scores for {len(prompts)} images")
        total = weight * r if total is None else total + weight * r
    return total


def decode_with_grad(policy, latents: torch.Tensor) -> torch.Tensor:
    """``policy.decode`` with gradients to ``latents`` [B, *L] -> images [B, 3, H, W] in [0, 1].

    The decoder's weights are frozen, so only the latents (and through them the policy) get gradients.
    Raises RuntimeError when the result has no graph to the latents (an adapter whose decode detaches).
    """
    images = policy.decode(latents)
    if latents.requires_grad and not images.requires_grad:
        raise RuntimeError(f"{type(policy).__name__}.decode returns images without a graph to the latents; "
                           "algorithm=reward_backprop needs a differentiable decode")
    return images


def step_arithmetic(sampler) -> ChainSampler:
    """The ChainSampler whose step arithmetic the rollout used (sampler=ode runs a flow chain at noise 0)."""
    chain = getattr(sampler, "chain", sampler)
    if not isinstance(chain, ChainSampler):
        raise TypeError(f"algorithm=reward_backprop re-runs sampling steps through a ChainSampler's arithmetic; "
                        f"{type(sampler).__name__} is not one")
    return chain


@torch.no_grad()
def rollout_noise(chain: ChainSampler, predict, traj: Trajectory, cond, start: int) -> dict[int, torch.Tensor]:
    """eps_j = (x_{j+1} - mean_j) / std_j [B, *L] of every stochastic step j >= start, from the stored latents.

    Must run under the rollout's weights (before any optimizer step of the iteration): mean_j is the
    rollout's transition mean at the stored x_j. A step with std 0 has eps 0 (x_{j+1} is its mean).
    """
    noise = {}
    for j in range(start, traj.latents.shape[1] - 1):
        if not bool(traj.stochastic[0, j]):
            continue
        x = traj.latents[:, j]
        out = predict(x, traj.sigmas[:, j], cond).float()
        mean, std = chain.transition(x, out, traj.sigmas, j, float(traj.noise_levels[0, j]), traj.prompt_ids)
        std = per_sample(std, x)
        noise[j] = torch.where(std > 0, (traj.latents[:, j + 1] - mean) / torch.where(std > 0, std, 1.0), 0.0)
    return noise


def replay(
    chain: ChainSampler, predict, traj: Trajectory, cond, start: int, noise: dict[int, torch.Tensor],
    checkpointing: bool,
) -> torch.Tensor:
    """Re-run steps start..S-1 from the stored x_start with gradients; returns [B, S-start+1, *L] (x_start..x_S).

    Deterministic steps are the rollout's (the kernel's first-order step or DPM-Solver++(2M), whose
    previous clean prediction at ``start`` comes from traj.pred_x0); stochastic step j is
    mean_j(x_j) + std_j * noise[j]. With the rollout's weights the result equals traj.latents[:, start:]
    (bitwise on deterministic steps, to rounding on stochastic ones).
    """
    sig = traj.sigmas
    S = traj.latents.shape[1] - 1

    def step(j: int, x: torch.Tensor, prev_x0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        out = predict(x, sig[:, j], cond).float()
        x0 = chain.kernel.clean(x, out, sig[:, j])
        if bool(traj.stochastic[0, j]):
            mean, std = chain.transition(x, out, sig, j, float(traj.noise_levels[0, j]), traj.prompt_ids)
            return mean + per_sample(std, x) * noise[j], x0
        return chain.deterministic_step(x, out, x0, sig, j, prev_x0, traj.prompt_ids), x0

    x = traj.latents[:, start]
    prev_x0 = traj.pred_x0[:, start - 1] if start > 0 else None
    xs = [x]
    for j in range(start, S):
        if checkpointing:
            # Non-reentrant: gradients reach the LoRA weights, which are not inputs of the step.
            x, prev_x0 = checkpoint(step, j, x, prev_x0, use_reentrant=False)
        else:
            x, prev_x0 = step(j, x, prev_x0)
        xs.append(x)
    return torch.stack(xs, 1)


def truncation_steps(cfg: RewardBackpropConfig, ctx: Context) -> int:
    """K for this iteration: last_k, or uniform on 1..last_k (the same draw on every rank)."""
    if cfg.truncation == "fixed":
        return cfg.last_k
    return 1 + int(torch.randint(cfg.last_k, (1,), generator=ctx.generator(*TRUNCATION_KEY)))


class RewardBackprop:
    """DRaFT-K / AlignProp: maximise the differentiable rewards through the last K sampling steps."""

    Config = RewardBackpropConfig
    needs_log_probs = False

    def __init__(self, cfg: RewardBackpropConfig):
        self.cfg = cfg

    @classmethod
    def problems(cls, cfg: RewardBackpropConfig, train_cfg, world_size: int) -> list[str]:
        p: list[str] = []
        if cfg.truncation not in TRUNCATIONS:
            p.append(f"algorithm.truncation ({cfg.truncation!r}) must be one of {TRUNCATIONS}")
        steps = train_cfg.sampler.num_steps - train_cfg.sampler.start_step
        if not 1 <= cfg.last_k <= steps:
            p.append(f"algorithm.last_k ({cfg.last_k}) must be in 1..{steps}, the steps of a rollout "
                     "(sampler.num_steps - sampler.start_step)")
        if not cfg.loss_scale > 0:
            p.append(f"algorithm.loss_scale ({cfg.loss_scale}) must be > 0")
        aggregate = _target_of(train_cfg.aggregate)
        if aggregate != WEIGHTED_SUM:
            p.append(f"aggregate ({aggregate}) is not used by algorithm=reward_backprop, which maximises the weighted "
                     "sum of the trained rewards: use aggregate=weighted_sum")
        p.extend(nondifferentiable_rewards(train_cfg.rewards))
        return p

    def needs_reference(self) -> bool:
        return False

    def micro_steps(self, n_chunks: int, n_stochastic: int) -> int:
        return n_chunks

    def rollout_weights(self, policy):
        return nullcontext()

    def update(self, batch: Batch, ctx: Context) -> dict[str, float]:
        c = self.cfg
        rewards = trained_rewards(ctx.rewards)
        chain = step_arithmetic(ctx.sampler)
        S = batch.chunks[0].latents.shape[1] - 1
        k = truncation_steps(c, ctx)
        mb = ctx.cfg.train.micro_batch
        conds = [ctx.encode(traj) for traj in batch.chunks]
        # Before any optimizer step: the rollout's noise of the re-run stochastic steps, chunk by chunk.
        noises = [rollout_noise(chain, ctx.predict, traj, cond, S - k) for traj, cond in zip(batch.chunks, conds)]
        for _ in range(c.inner_epochs):
            for ci in ctx.chunk_order(len(batch.chunks)):
                traj, rows = batch.chunks[ci], slice(ci * mb, (ci + 1) * mb)
                final = replay(chain, ctx.predict, traj, conds[ci], S - k, noises[ci], c.checkpointing)[:, -1]
                images = decode_with_grad(ctx.policy, final)
                total = weighted_reward(rewards, images, batch.prompts[rows], batch.meta[rows])
                loss = -c.loss_scale * total.mean()
                # replay_dev: how far the re-run sample is from the rollout's (0 for an ODE rollout until
                # the first optimizer step; grows as the policy moves).
                ctx.backward(loss, {"reward": total.detach().mean(),
                                    "replay_dev": (final.detach() - traj.final).abs().max()})
        return {"train/truncation_k": float(k)}

    def after_update(self, policy) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"reward_backprop keeps no state, but the checkpoint's algorithm_state.pt holds {sorted(state)}")
