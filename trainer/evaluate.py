"""Held-out evaluation: ODE samples from a fixed seed stream, scored by the reward ensembles."""
from __future__ import annotations

from pathlib import Path

import torch

from trainer.distributed import World, global_nanmean
from trainer.metrics import save_grid
from trainer.rng import STREAM_EVAL
from trainer.rollout import rollout_chunks


@torch.no_grad()
def evaluate(
    policy, sampler, ensembles: list, prompts: list[str], world: World, seed: int, batch: int, height: int, width: int,
    grid_path: Path | None = None, observe=None,
) -> dict[str, float]:
    """Mean eval reward over ``prompts`` (one sample each), sharded across ranks.

    The noise of prompt i is ``generator(seed, STREAM_EVAL, 0, i, 0)`` at every evaluation, so
    before/after scores compare the same starting points. Prompts beyond a multiple of world_size
    are dropped so that every rank scores equally many (the collective needs equal shapes).
    ``observe(per_reward {name: [n_local]}, images [n_local, 3, H, W]) -> dict`` (every rank) adds
    metrics computed from the samples themselves (the reward-hacking monitors). Video policies give
    [n_local, F, 3, H, W]; their grid is written as an animated GIF beside ``grid_path`` (suffix .gif).
    Returns {"eval/<reward>": mean, "eval/<reward>/<component>": nan-mean, "eval/num_prompts": n}.
    """
    n = len(prompts) - len(prompts) % world.world_size
    if n == 0:
        raise ValueError(f"eval needs at least world_size={world.world_size} prompts, got {len(prompts)}")
    ids = torch.arange(n)[world.rank :: world.world_size]
    chunks, images = rollout_chunks(
        policy, sampler, prompts, ids, torch.zeros_like(ids), (seed, STREAM_EVAL, 0), sampler.num_steps,
        sampler.guidance_scale, batch, height, width,
    )
    del chunks
    local_prompts = [prompts[int(i)] for i in ids]
    values: dict[str, torch.Tensor] = {}
    first_total = None
    per_reward = {}
    for ensemble in ensembles:
        result = ensemble(images, local_prompts, [{"prompt_id": int(i), "sample_id": 0} for i in ids])
        first_total = result.total if first_total is None else first_total
        per_reward.update(result.per_reward)
        values.update({f"eval/{name}": r for name, r in result.per_reward.items()})
        values.update({f"eval/{key}": c for key, c in result.components.items()})
    metrics = global_nanmean(values)
    metrics["eval/num_prompts"] = n
    if observe is not None:
        metrics.update(observe(per_reward, images))
    if grid_path is not None and world.is_main:
        # Rank 0's own shard is enough to look at; gathering images would cost a collective per eval.
        k = min(32, len(images))
        caps = [f"{local_prompts[i]} | {first_total[i]:.2f}" for i in range(k)]
        save_grid(images[:k], caps, grid_path)
    return metrics
