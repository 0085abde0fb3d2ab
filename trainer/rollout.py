"""Generate samples for a list of (prompt id, sample index) pairs, in micro-batch chunks."""
from __future__ import annotations

import torch

from samplers.trajectory import Trajectory
from trainer.rng import generator


def rollout_chunks(
    policy, sampler, prompts: list[str], prompt_ids: torch.Tensor, sample_ids: torch.Tensor, seed_parts: tuple[int, ...],
    num_steps: int, guidance_scale: float, micro_batch: int, height: int, width: int,
) -> tuple[list[Trajectory], torch.Tensor]:
    """Roll out every sample, ``micro_batch`` at a time.

    Sample i's noise comes from ``generator(*seed_parts, prompt_ids[i], sample_ids[i])`` alone.
    Training replays the same chunks with the same shapes, which is what makes the recomputed
    log-prob bitwise equal to the rollout's (ratio exactly 1 on-policy).

    Returns (trajectories, one per chunk, on the policy device; images [N, 3, H, W] in [0, 1] on CPU).
    """
    sigmas = policy.sigmas(num_steps).to(policy.device)
    shape = policy.latent_shape(height, width)
    chunks, images = [], []
    for start in range(0, len(prompt_ids), micro_batch):
        pids, sids = prompt_ids[start : start + micro_batch], sample_ids[start : start + micro_batch]
        gens = [generator(*seed_parts, int(p), int(s)) for p, s in zip(pids, sids)]
        x_T = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(policy.device)
        cond = policy.encode([prompts[int(p)] for p in pids])
        traj = sampler.rollout(
            lambda x, sigma, c: policy.predict(x, sigma, c, guidance_scale), x_T, sigmas, cond, gens,
            pids.to(policy.device), sids.to(policy.device),
        )
        chunks.append(traj)
        images.append(policy.decode(traj.final).cpu())
    return chunks, torch.cat(images)
