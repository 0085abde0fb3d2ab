"""Generate samples for a list of (prompt id, sample index) pairs, in micro-batch chunks."""
from __future__ import annotations

import torch

from samplers.trajectory import Trajectory
from trainer.rng import STREAM_CLEAN, generator

# Key of the sampler's state (e.g. a calibrated noise table) in the checkpoint's trainer_state.json:
# the state is a few JSON numbers, and that file is written atomically with the rest of the checkpoint.
SAMPLER_STATE_KEY = "sampler"


def rollout_chunks(
    policy, sampler, prompts: list[str], prompt_ids: torch.Tensor, sample_ids: torch.Tensor, seed_parts: tuple[int, ...],
    num_steps: int, guidance_scale: float, micro_batch: int, height: int, width: int, iteration: int = 0,
    x0: torch.Tensor | None = None, on_chunk=None, decode: bool = True,
) -> tuple[list[Trajectory], torch.Tensor | None]:
    """Roll out every sample, ``micro_batch`` at a time.

    Sample i's noise comes from ``generator(*seed_parts, prompt_ids[i], sample_ids[i])`` alone; the
    iteration's plan (which steps are stochastic, e.g. a random window) from ``generator(*seed_parts)``
    and ``iteration``, so every rank and every chunk of an iteration uses the same plan. Training
    replays the same chunks with the same shapes, which is what makes the recomputed log-prob bitwise
    equal to the rollout's (ratio exactly 1 on-policy).

    Args:
      x0: [N, *L] clean latents, one per sample, for a sampler with start_step > 0 (a partial chain
        from x0 forward-noised to sigmas[start_step] with the sample's own initial noise).
      on_chunk: called as ``on_chunk(start, images [b, 3, H, W])`` as soon as each chunk is decoded
        (the trainer starts scoring it while the next chunk samples).
      decode: False skips decoding (callers that keep only latents); images is then None.
    Returns (trajectories, one per chunk, on the policy device; images [N, 3, H, W] in [0, 1] on CPU).
    """
    sigmas = policy.sigmas(num_steps)
    plan = sampler.plan(sigmas, iteration, generator(*seed_parts))
    sigmas = sigmas.to(policy.device)
    if on_chunk is not None and not decode:
        raise ValueError("on_chunk receives decoded images: it needs decode=True")
    if sampler.start_step > 0 and x0 is None:
        raise ValueError(f"sampler.start_step={sampler.start_step} starts from forward-noised clean samples: pass x0")
    shape = policy.latent_shape(height, width)
    chunks, images = [], []
    for start in range(0, len(prompt_ids), micro_batch):
        pids, sids = prompt_ids[start : start + micro_batch], sample_ids[start : start + micro_batch]
        gens = [generator(*seed_parts, int(p), int(s)) for p, s in zip(pids, sids)]
        x_T = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(policy.device)
        if sampler.start_step > 0:
            x_T = sampler.start(x0[start : start + micro_batch].to(policy.device), sigmas, x_T)
        cond = policy.encode([prompts[int(p)] for p in pids])
        traj = sampler.rollout(
            lambda x, sigma, c: policy.predict(x, sigma, c, guidance_scale), x_T, sigmas, cond, gens,
            pids.to(policy.device), sids.to(policy.device), plan=plan,
        )
        chunks.append(traj)
        if not decode:
            continue
        images.append(policy.decode(traj.final).cpu())
        if on_chunk is not None:
            on_chunk(start, images[-1])
    return chunks, torch.cat(images) if decode else None


@torch.no_grad()
def step_reward_gains(policy, rewards, chunks: list[Trajectory], prompts: list[str]) -> torch.Tensor:
    """[N, S]: how much each stochastic step raised the reward of the clean prediction, NaN elsewhere.

    Gain of step j = R(decode(x0_hat_{j+1})) - R(decode(x0_hat_j)), with x0_hat_S the sample itself:
    the one-step estimate of DenseGRPO's dense reward (which completes each x_j with the ODE instead).
    Costs a decode and a reward call per stochastic step and sample.
    """
    out = []
    for traj in chunks:
        local = [prompts[int(p)] for p in traj.prompt_ids]
        meta = [{"prompt_id": int(p), "sample_id": int(s)} for p, s in zip(traj.prompt_ids, traj.sample_ids)]
        clean = torch.cat([traj.pred_x0, traj.latents[:, -1:]], 1)  # [B, S+1, *L]
        steps = traj.stochastic[0].nonzero().flatten().tolist()
        score = {j: rewards(policy.decode(clean[:, j]), local, meta).total for j in sorted({*steps, *(j + 1 for j in steps)})}
        gains = torch.full(traj.stochastic.shape, float("nan"))
        for j in steps:
            gains[:, j] = score[j + 1] - score[j]
        out.append(gains)
    return torch.cat(out)


class BaseSamples:
    """Clean latents that partial chains start from (``data.clean_source=base``): the base (reference)
    policy's deterministic sample of (prompt id, variant), variant = sample id % ``variants``.

    Each comes from the evaluation sampler (the whole deterministic chain) with noise from
    ``generator(seed, STREAM_CLEAN, prompt id, variant)``. Pairs are computed on first use in fixed
    blocks of ``micro_batch`` consecutive global indices (prompt id * variants + variant) and cached, so a
    pair's latent never depends on which rank asks, in which order, or whether the run was resumed
    (the cache is not checkpointed: it is recomputed bit for bit).
    """

    def __init__(self, policy, eval_sampler, prompts: list[str], seed: int, variants: int, micro_batch: int,
                 height: int, width: int):
        self.policy, self.sampler, self.prompts = policy, eval_sampler, prompts
        self.seed, self.variants, self.micro_batch = seed, variants, micro_batch
        self.height, self.width = height, width
        self.cache: dict[int, torch.Tensor] = {}  # global index -> [*L] on CPU

    def _block(self, b: int) -> None:
        index = torch.arange(b * self.micro_batch, min((b + 1) * self.micro_batch, len(self.prompts) * self.variants))
        pids, vids = index // self.variants, index % self.variants
        with torch.no_grad(), self.policy.reference():
            chunks, _ = rollout_chunks(
                self.policy, self.sampler, self.prompts, pids, vids, (self.seed, STREAM_CLEAN), self.sampler.num_steps,
                self.sampler.guidance_scale, self.micro_batch, self.height, self.width, decode=False,
            )
        for i, x0 in zip(index.tolist(), torch.cat([c.final for c in chunks]).cpu()):
            self.cache[i] = x0

    def __call__(self, prompt_ids: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        """[N, *L] clean latents (CPU) for N (prompt id, sample id) pairs."""
        keys = (prompt_ids.cpu() * self.variants + sample_ids.cpu() % self.variants).tolist()
        for b in sorted({k // self.micro_batch for k in keys if k not in self.cache}):
            self._block(b)
        return torch.stack([self.cache[k] for k in keys])
