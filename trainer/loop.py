"""The training loop every algorithm shares, read top to bottom.

One iteration, on every rank of one process group:
  draw prompts -> roll out G samples each -> score (overlapped with sampling) -> the algorithm's
  update (trainer/algorithms/: advantages, losses, DeepSpeed backward/step through ctx.backward)
  -> log, watch for reward hacking, evaluate, checkpoint, honour stop signals.
"""
from __future__ import annotations

import contextlib
import json
import secrets
import time
from dataclasses import asdict
from pathlib import Path

import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file
from tqdm import tqdm

from rewards.ensemble import RewardEnsemble, RewardResult
from samplers.base import Sampler
from trainer.algorithms.base import Algorithm, Batch, Context, Stepper
from trainer.checkpoint import (
    ALGORITHM_STATE_FILE, EMA_FILE, ENGINE_TAG, REWARDS_STATE_FILE, load_rank_rng, save_checkpoint, set_rng_state,
)
from trainer.config import TrainConfig, check_prediction
from trainer.distributed import World, all_reduce_max, global_nanmean
from trainer.ema import PolicyEMA
from trainer.engine import build_engine
from trainer.preemption import Preempted, StopRequests
from trainer.resume import ResumePoint
from trainer.evaluate import evaluate
from trainer.metrics import MetricsWriter, save_grid
from trainer.monitors import HackingMonitor, RewardHackingStop
from trainer.plots import plot_curves
from trainer.prompts import load_prompts, step_prompt_ids
from trainer.rng import STREAM_ROLLOUT, generator
from trainer.rollout import SAMPLER_STATE_KEY, BaseSamples, rollout_chunks, step_reward_gains


def _reward_values(result) -> dict[str, torch.Tensor]:
    """Per-sample reward tensors [N_local] keyed by metric name."""
    values = {"reward/total": result.total}
    values.update({f"reward/{name}": r for name, r in result.per_reward.items()})
    values.update({f"reward/{key}": c for key, c in result.components.items()})
    return values


class NonFiniteError(RuntimeError):
    """Too many consecutive updates were skipped because a reward, loss or gradient was not finite."""


def _any_nonfinite(x: torch.Tensor) -> bool:
    """True on every rank if any rank's ``x`` holds a NaN or inf (one all-reduce)."""
    local = torch.tensor([0.0 if bool(torch.isfinite(x).all()) else 1.0])
    return bool(all_reduce_max(local)[0] > 0)


def summarize(run_dir: Path, steps: int) -> dict:
    """The run's summary from its metrics.jsonl: evaluations at step 0 and at ``steps``.

    Built from the rows rather than from memory, so a resumed run (or one whose last launch died
    after its final checkpoint) gets the same summary as an uninterrupted one.
    """
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # metrics.jsonl writes NaN/inf as strings (JSON has none): back to floats here.
    evals = {r["step"]: {k: float(v) if isinstance(v, str) else v for k, v in r.items() if k.startswith("eval/")}
             for r in rows if "eval/num_prompts" in r}
    return {"run_dir": str(run_dir), "eval_before": evals.get(0, {}), "eval_after": evals.get(steps, {}), "steps": steps}


def train(
    cfg: TrainConfig, world: World, run_dir: Path, resolved_yaml: str, resume: ResumePoint | None = None,
    stop: StopRequests | None = None,
) -> dict:
    """Run the configured algorithm from ``resume`` (default: step 0); returns the summary written to
    ``run_dir/summary.json``.

    Raises Preempted after saving when ``stop`` reports a signal, NonFiniteError after
    ``train.max_consecutive_skips`` consecutive skipped updates.
    """
    resume = resume or ResumePoint()
    t_start = time.time()
    algo, tcfg = cfg.algorithm, cfg.train
    prompts = load_prompts(cfg.data.prompts, "data.prompts", cfg.data.max_prompt_chars)
    eval_prompts = load_prompts(cfg.data.eval_prompts, "data.eval_prompts", cfg.data.max_prompt_chars)
    if cfg.data.prompts_per_step > len(prompts):  # checked before the model loads
        raise ValueError(f"data.prompts_per_step ({cfg.data.prompts_per_step}) exceeds the {len(prompts)} prompts in "
                         f"data.prompts={cfg.data.prompts!r}; lower it or add prompts")
    if cfg.data.eval_size:
        eval_prompts = eval_prompts[: cfg.data.eval_size]
    # Rewards before the model: a reward that cannot score these prompts (OCR on prompts quoting no text)
    # fails here, in seconds, not after the model has loaded and the first batch is drawn.
    rewards = RewardEnsemble(cfg.rewards)
    eval_rewards = RewardEnsemble(cfg.eval_rewards) if cfg.eval_rewards else None
    rewards.check_prompts(prompts, f"data.prompts={cfg.data.prompts!r}")
    rewards.check_prompts(eval_prompts, f"data.eval_prompts={cfg.data.eval_prompts!r}")
    if eval_rewards is not None:
        eval_rewards.check_prompts(eval_prompts, f"data.eval_prompts={cfg.data.eval_prompts!r}", "eval_rewards")
    # Seeded before the model is built: LoRA's random init draws from the global generator.
    torch.manual_seed(cfg.seed)
    algorithm: Algorithm = get_class(algo._target_)(algo)
    # Partial chains from the base model's samples need the frozen base too.
    policy = instantiate(cfg.model, device=str(world.device),
                         needs_reference=algorithm.needs_reference() or cfg.data.clean_source == "base")
    sampler: Sampler = instantiate(asdict(cfg.sampler))
    check_prediction(policy, sampler)
    if hasattr(getattr(sampler, "reward_guidance", None), "bind"):  # guidance that decodes or reads prompts
        sampler.reward_guidance.bind(policy, prompts)
    eval_sampler = sampler.evaluation()
    aggregator = instantiate(cfg.aggregate)
    # Scoring chunk by chunk equals scoring the batch unless a reward compares samples (a win rate).
    overlap_rewards = tcfg.overlap_rewards and rewards.chunkable
    if tcfg.overlap_rewards and not overlap_rewards and world.is_main:
        print("train.overlap_rewards is off for this run: a reward compares samples within a group, so the "
              "whole batch is scored after the rollout", flush=True)
    monitor = None
    if cfg.monitor.enabled:
        trained = [n for n, wt in rewards.weights.items() if wt != 0 and n not in rewards.regularizers]
        gold = cfg.monitor.gold if cfg.monitor.gold is not None else list(cfg.eval_rewards)
        monitor = HackingMonitor(cfg.monitor, trained, gold)

    P, G = cfg.data.prompts_per_step, algo.group_size
    n_local = P * G // world.world_size
    n_chunks = n_local // tcfg.micro_batch
    # Every iteration's plan has this many stochastic steps (windows keep their size as they move),
    # so DeepSpeed's fixed accumulation count holds.
    n_stochastic = sampler.plan(policy.sigmas(sampler.num_steps), 0, generator(cfg.seed, STREAM_ROLLOUT, 0)).num_stochastic
    grad_accum = algorithm.micro_steps(n_chunks, n_stochastic) // algo.optimizer_steps_per_epoch
    engine, optimizer, guard = build_engine(
        policy, cfg.optimizer, cfg.deepspeed, tcfg.micro_batch, grad_accum, world.world_size, algo.max_grad_norm,
        cfg.scheduler, resume.universal,
    )
    ema = (PolicyEMA(policy.transformer, tcfg.ema_decay, tcfg.ema_every, tcfg.ema_warmup)
           if tcfg.ema_decay is not None else None)
    # Everything the loop changes besides the engine and the generators (saved in trainer_state.json).
    state = {"wandb_id": secrets.token_hex(4), "skipped_updates": 0, "consecutive_skips": 0}
    if resume.checkpoint is not None:
        t_load = time.time()
        # The frozen base is not in the engine files (only trainable weights are): load non-strictly.
        engine.load_checkpoint(str(resume.load_dir), tag=ENGINE_TAG, load_module_strict=False)
        rng = load_rank_rng(resume.checkpoint, world.rank)
        if rng is not None:
            set_rng_state(rng)
        if (resume.checkpoint / REWARDS_STATE_FILE).is_file():
            rewards.load_state_dict(torch.load(resume.checkpoint / REWARDS_STATE_FILE, weights_only=False))
        if ema is not None:
            if not (resume.checkpoint / EMA_FILE).is_file():
                raise FileNotFoundError(f"{resume.checkpoint} holds no {EMA_FILE}: it was saved without train.ema_decay")
            ema.load_state_dict(load_file(str(resume.checkpoint / EMA_FILE)))
        if (resume.checkpoint / ALGORITHM_STATE_FILE).is_file():
            algorithm.load_state_dict(torch.load(resume.checkpoint / ALGORITHM_STATE_FILE, weights_only=False))
        sampler.load_state_dict(resume.state.get(SAMPLER_STATE_KEY, {}))
        state.update({k: resume.state[k] for k in state})
        if monitor is not None:
            monitor.load_state_dict(resume.state.get("monitor", {}))
        if world.is_main:
            print(f"restored weights, optimizer, schedule and generator states from {resume.checkpoint.name} in "
                  f"{time.time() - t_load:.2f} s", flush=True)
    writer = MetricsWriter(
        run_dir, cfg.logger, OmegaConf.to_container(OmegaConf.create(resolved_yaml)), world.is_main, state["wandb_id"]
    )
    h, w = policy.height, policy.width
    clean = None
    if cfg.data.clean_source == "base":
        clean = BaseSamples(policy, eval_sampler, prompts, cfg.seed, cfg.data.clean_variants, tcfg.micro_batch, h, w)

    def run_eval(step: int) -> dict[str, float]:
        # With an EMA, what is evaluated (and exported with ema=true) is the EMA.
        with ema.swapped_in() if ema is not None else contextlib.nullcontext():
            metrics = evaluate(
                policy, eval_sampler, [rewards] + ([eval_rewards] if eval_rewards else []), eval_prompts, world,
                cfg.seed, tcfg.eval_batch, h, w, grid_path=run_dir / "samples" / f"eval_{step:06d}.png",
                observe=monitor.on_eval if monitor is not None else None,
            )
        writer.log(step, metrics)
        react(metrics, step)
        return metrics

    def react(metrics: dict, step: int) -> None:
        """Apply the reward-hacking rules: warn once per rule, or save and stop."""
        for fired in monitor.check(metrics) if monitor is not None else []:
            if fired.action == "stop":
                ckpt = save(step)
                writer.close()
                raise RewardHackingStop(f"{fired.message(step)}; checkpoint {ckpt}")
            if fired.rule not in monitor.warned:
                monitor.warned.add(fired.rule)
                if world.is_main:
                    print(f"\nWARNING: {fired.message(step)}", flush=True)

    save_seconds: list[float] = []  # reported in the next step's metrics row (time/checkpoint)

    def save(step: int) -> Path:
        t = time.time()
        trainer_state = {**state, "world_size": world.world_size, "zero_stage": cfg.deepspeed.zero_stage,
                         "monitor": monitor.state_dict() if monitor is not None else {},
                         SAMPLER_STATE_KEY: sampler.state_dict()}
        path = save_checkpoint(
            engine, policy, run_dir, step, resolved_yaml, world, trainer_state, rewards.state_dict(), tcfg.keep_last,
            algorithm.state_dict(), ema.state_dict() if ema is not None else None,
        )
        save_seconds.append(time.time() - t)
        return path

    if resume.step == 0:
        run_eval(0)
    bar = tqdm(total=tcfg.steps, initial=resume.step, desc=type(algorithm).__name__.lower(), disable=not (world.is_main and tcfg.progress),
               dynamic_ncols=True)
    for step in range(resume.step, tcfg.steps):
        t0 = time.time()
        # --- which samples this rank owns: the global list is P prompts x G samples, rank-major.
        step_ids = step_prompt_ids(len(prompts), P, step, cfg.seed)
        global_pids, global_sids = step_ids.repeat_interleave(G), torch.arange(G).repeat(P)
        own = slice(world.rank * n_local, (world.rank + 1) * n_local)
        pids, sids = global_pids[own], global_sids[own]

        local_prompts = [prompts[int(p)] for p in pids]
        meta = [{"prompt_id": int(p), "sample_id": int(s)} for p, s in zip(pids, sids)]
        futures = []

        def score_chunk(start: int, chunk_images: torch.Tensor) -> None:
            end = start + len(chunk_images)
            futures.append(rewards.submit(chunk_images, local_prompts[start:end], meta[start:end]))

        # --- rollout (with train.overlap_rewards, each chunk is scored while the next one samples)
        with algorithm.rollout_weights(policy):
            chunks, images = rollout_chunks(
                policy, sampler, prompts, pids, sids, (cfg.seed, STREAM_ROLLOUT, step), sampler.num_steps,
                sampler.guidance_scale, tcfg.micro_batch, h, w, iteration=step,
                x0=clean(pids, sids) if clean is not None else None, on_chunk=score_chunk if overlap_rewards else None,
            )
        t_rollout = time.time()

        # --- rewards and advantages (groups may span ranks: gathered inside)
        if futures:
            scored = RewardResult.cat([f.result() for f in futures])
        else:
            scored = rewards(images, local_prompts, meta)
        # A non-finite reward would poison every advantage of its group: skip this update on all ranks.
        reward_ok = not _any_nonfinite(scored.total)
        t_reward = time.time()

        # --- the algorithm's update: inner epochs x optimizer_steps_per_epoch optimizer steps (DeepSpeed
        # accumulates micro-steps and steps the optimizer at each boundary, behind the non-finite guard).
        stepper = Stepper(engine, guard, state, step + 1)
        algo_metrics: dict[str, float] = {}
        if reward_ok:
            batch = Batch(chunks, images, scored, pids, sids, local_prompts, meta)
            ctx = Context(cfg, policy, sampler, rewards, aggregator, world, prompts, step, stepper)
            algo_metrics = algorithm.update(batch, ctx)
            algorithm.after_update(policy)
        else:
            stepper.skipped = algo.inner_epochs * algo.optimizer_steps_per_epoch
        if ema is not None:
            # Optimizer steps taken so far (skipped ones included: the ramp follows the schedule, not luck).
            ema.update(step + 1, (step + 1) * algo.inner_epochs * algo.optimizer_steps_per_epoch)
        t_train = time.time()

        metrics = global_nanmean(_reward_values(scored))
        # Where this iteration's noise went (moves with sliding and random windows), in chain steps.
        first = chunks[0].stochastic[0].nonzero()
        if len(first):  # a deterministic rollout (sampler=ode, for forward-process or reward-backprop methods) has none
            metrics["sampler/first_stochastic_step"] = sampler.start_step + int(first[0])
        if sampler.needs_step_rewards:
            # Reward-aware noise calibration: the share of samples (over all ranks, so every rank's
            # sampler stays identical) whose clean-prediction reward rose over each stochastic step.
            rose = step_reward_gains(policy, rewards, chunks, prompts)
            rose = torch.where(torch.isnan(rose), rose, (rose > 0).float())
            share = global_nanmean({f"{j:04d}": rose[:, j] for j in range(rose.shape[1])})
            sampler.calibrate(torch.tensor([share[f"{j:04d}"] for j in range(rose.shape[1])]))
            metrics.update({f"sampler/{k}/{j}": v for k, vs in sampler.state_dict().items() for j, v in enumerate(vs)})
        metrics.update(algo_metrics)  # global already: same on every rank
        metrics.update(global_nanmean({k: torch.stack(v) for k, v in stepper.stats.items()}))
        metrics["train/onpolicy_log_ratio_max"] = float(all_reduce_max(stepper.onpolicy_dev.reshape(1))[0])
        grad_norms = stepper.grad_norms
        metrics["train/grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
        if not reward_ok:
            state["consecutive_skips"] += stepper.skipped
        state["skipped_updates"] += stepper.skipped
        metrics["train/skipped_updates"] = stepper.skipped
        metrics["train/skipped_updates_total"] = state["skipped_updates"]
        metrics["train/lr"] = optimizer.param_groups[0]["lr"]
        metrics.update({
            "time/rollout": t_rollout - t0, "time/reward": t_reward - t_rollout, "time/train": t_train - t_reward,
            "time/step": t_train - t0, "throughput/images_per_s": P * G / (t_train - t0),
        })
        if save_seconds:
            metrics["time/checkpoint"] = save_seconds.pop()
        if monitor is not None:
            metrics.update(monitor.on_train(scored.total, pids, images))
        writer.log(step + 1, metrics)
        react(metrics, step + 1)
        if world.is_main and tcfg.grid_every and (step % tcfg.grid_every == 0 or step == tcfg.steps - 1):
            k = min(16, len(local_prompts))
            caps = [f"{local_prompts[i]} | r={scored.total[i]:.2f}" for i in range(k)]
            writer.log_image(step + 1, "samples/train", save_grid(images[:k], caps, run_dir / "samples" / f"train_{step + 1:06d}.png"))
        if tcfg.eval_every and (step + 1) % tcfg.eval_every == 0 and step + 1 < tcfg.steps:
            run_eval(step + 1)
        saved = None
        if tcfg.save_every and (step + 1) % tcfg.save_every == 0 and step + 1 < tcfg.steps:
            saved = save(step + 1)
        bar.set_postfix(reward=f"{metrics['reward/total']:.3f}", kl=f"{metrics.get('train/kl', float('nan')):.2e}",
                        refresh=False)
        bar.update(1)
        if state["consecutive_skips"] >= tcfg.max_consecutive_skips:
            bar.close()
            writer.close()
            raise NonFiniteError(
                f"{state['consecutive_skips']} consecutive updates skipped (step {step + 1}): a reward, loss or gradient "
                f"was NaN/inf each time (train.max_consecutive_skips={tcfg.max_consecutive_skips}). Check the rewards "
                f"(reward/* in {run_dir / 'metrics.jsonl'}) and lower optimizer.lr; the weights are those of the last "
                f"good update, and the newest complete checkpoint is under {run_dir / 'checkpoints'}."
            )
        # Every rank calls agreed() at the same point: the one collective that turns a signal into a stop.
        signum = stop.agreed() if stop is not None else 0
        if signum and step + 1 < tcfg.steps:
            ckpt = saved or save(step + 1)
            bar.close()
            writer.close()
            raise Preempted(signum, step + 1, ckpt)
    bar.close()

    if resume.step < tcfg.steps:
        run_eval(tcfg.steps)
        ckpt = save(tcfg.steps)
    else:  # the last launch died after its final checkpoint: only the summary and plots are missing
        ckpt = resume.checkpoint
    summary = {**summarize(run_dir, tcfg.steps), "checkpoint": str(ckpt), "wall_time_s": time.time() - t_start}
    if world.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        reward_keys = ["reward/total", *(f"reward/{n}" for n in rewards.rewards if len(rewards.rewards) > 1)]
        eval_keys = [k for k in summary["eval_after"] if k.count("/") == 1 and k != "eval/num_prompts"]
        plot_curves(rows, reward_keys, run_dir / "plots" / "reward.png", "training reward (mean over samples)")
        plot_curves(rows, eval_keys, run_dir / "plots" / "eval.png", "held-out evaluation (ODE)")
        plot_curves(rows, ["train/kl", "train/clip_frac"], run_dir / "plots" / "train.png", "KL to reference, clip fraction")
    writer.close()
    for ensemble in (rewards, eval_rewards):
        if ensemble is not None:
            ensemble.close()  # worker processes (executor=process) end with the job, not with the interpreter
    return summary
