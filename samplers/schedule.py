"""Where the noise goes: stochastic windows over the chain and per-step noise levels, as pure functions.

Windows (which steps draw noise; only those are trained):
  fixed    steps [window_start, window_start + window_size), cut at the last step that can carry noise;
           window_size null = every such step from window_start on (Flow-GRPO, DanceGRPO).
  sliding  a window of window_size steps whose start moves by window_stride steps every window_every
           iterations, from window_start until it reaches the end of the chain, where it stays (MixGRPO,
           Li et al. 2025, "MixGRPO: Unlocking Flow-based GRPO Efficiency with Mixed ODE-SDE").
  random   a window of window_size steps at a start drawn uniformly from [window_start, window_start_max]
           each iteration (Flow-GRPO-Fast). The draw comes from the generator the caller passes, which
           the trainer seeds from (seed, iteration): a pure function of both, so resumes and any number of
           ranks agree.

Noise level of stochastic step j: eta_j = noise_level * m_j * c_j, where m_j is the schedule
  constant  1
  decay     noise_decay ** j: most noise early in the chain, where it diversifies layouts (HiCoGen's
            argument that early noise dominates diversity)
  table     noise_table[j], an explicit per-step multiplier
and c_j is the reward-aware calibration multiplier (1 unless calibration is on; see chain.py).
"""
from __future__ import annotations

import math

import torch

NOISE_SCHEDULES = ("constant", "decay", "table")
WINDOWS = ("fixed", "sliding", "random")
ODE_SOLVERS = ("euler", "dpm2")


def window_mask(
    feasible: torch.Tensor, window: str, start: int, size: int | None, stride: int | None, every: int | None,
    start_max: int | None, iteration: int, generator: torch.Generator | None,
) -> torch.Tensor:
    """[S] bool: the stochastic steps of one iteration.

    Args:
      feasible: [S] bool, the steps that can carry noise (a contiguous run; the kernel and the
        partial-chain start decide it).
      window, start, size, stride, every, start_max: the sampler's window knobs (module docstring).
      iteration: training iteration (sliding windows move with it).
      generator: the per-iteration draw of random windows.
    Raises ValueError when the window does not fit the feasible steps.
    """
    S = feasible.numel()
    idx = feasible.nonzero().flatten().tolist()
    if not idx:
        raise ValueError("no step of this chain can carry noise (every step has zero noise by construction)")
    lo, hi = idx[0], idx[-1] + 1  # feasible steps are [lo, hi)
    if idx != list(range(lo, hi)):
        raise ValueError(f"the steps that can carry noise are not contiguous: {idx}")
    mask = torch.zeros(S, dtype=torch.bool)
    if window == "fixed":
        first = max(start, lo)
        end = hi if size is None else min(hi, start + size)
        if first >= end:
            raise ValueError(
                f"sampler.window_start ({start}) with window_size ({size}) selects no step that can carry noise: "
                f"those are steps [{lo}, {hi}) of this {S}-step chain")
        mask[first:end] = True
        return mask
    last_start = hi - size  # the window always has exactly `size` steps: constant work per iteration
    if start < lo or last_start < start:
        raise ValueError(
            f"a {window} window of sampler.window_size={size} steps from sampler.window_start={start} does not fit "
            f"the steps that can carry noise, [{lo}, {hi}) of this {S}-step chain")
    if window == "sliding":
        pos = min(start + stride * (iteration // every), last_start)
    elif window == "random":
        top = last_start if start_max is None else min(start_max, last_start)
        if generator is None:
            raise ValueError("a random window needs the iteration's generator (rollout_chunks passes it)")
        pos = int(torch.randint(start, top + 1, (1,), generator=generator))
    else:
        raise ValueError(f"sampler.window must be one of {WINDOWS}, got {window!r}")
    mask[pos : pos + size] = True
    return mask


def noise_multipliers(schedule: str, num_steps: int, decay: float | None, table: list[float] | None) -> list[float]:
    """m_j for j < num_steps (Python floats: the calibration multiplies them exactly the same everywhere)."""
    if schedule == "constant":
        return [1.0] * num_steps
    if schedule == "decay":
        return [decay**j for j in range(num_steps)]
    if schedule == "table":
        if len(table) != num_steps:
            raise ValueError(f"sampler.noise_table has {len(table)} entries but the chain has {num_steps} steps")
        return list(table)
    raise ValueError(f"sampler.noise_schedule must be one of {NOISE_SCHEDULES}, got {schedule!r}")


def _only_for(problems: list[str], knobs: dict, key: str, owner: str, value: str) -> None:
    """A knob set while the mode that reads it is off is an error, never silently ignored."""
    if knobs.get(key) is not None and knobs.get(owner) != value:
        problems.append(f"sampler.{key} ({knobs[key]}) is only read when sampler.{owner}={value} (it is "
                        f"{knobs.get(owner)!r}); remove it or set sampler.{owner}={value}")


def knob_problems(knobs: dict) -> list[str]:
    """Every violation of the rules between the knobs present in ``knobs`` (a sampler's config as a dict).

    Only keys present are checked, so the same rules serve the ODE sampler (no noise knobs) and the
    stochastic ones. Messages name the key, the value and the fix.
    """
    p: list[str] = []
    n = knobs.get("num_steps", 1)
    for key in ("num_steps", "eval_num_steps"):
        if key in knobs and knobs[key] < 1:
            p.append(f"sampler.{key} ({knobs[key]}) must be >= 1")
    if "ode_solver" in knobs and knobs["ode_solver"] not in ODE_SOLVERS:
        p.append(f"sampler.ode_solver ({knobs['ode_solver']!r}) must be one of {ODE_SOLVERS}")
    start_step = knobs.get("start_step", 0)
    if not 0 <= start_step < max(n, 1):
        p.append(f"sampler.start_step ({start_step}) must be in [0, sampler.num_steps={n})")
    if "noise_level" not in knobs:
        return p
    if knobs["noise_level"] < 0:
        p.append(f"sampler.noise_level ({knobs['noise_level']}) must be >= 0")
    if knobs.get("log_prob_reduction", "mean") not in ("mean", "sum"):
        p.append(f"sampler.log_prob_reduction ({knobs['log_prob_reduction']!r}) must be 'mean' or 'sum'")

    schedule = knobs.get("noise_schedule", "constant")
    if schedule not in NOISE_SCHEDULES:
        p.append(f"sampler.noise_schedule ({schedule!r}) must be one of {NOISE_SCHEDULES}")
    _only_for(p, knobs, "noise_decay", "noise_schedule", "decay")
    _only_for(p, knobs, "noise_table", "noise_schedule", "table")
    if schedule == "decay" and not (knobs.get("noise_decay") is not None and 0 < knobs["noise_decay"] <= 1):
        p.append(f"sampler.noise_decay ({knobs.get('noise_decay')}) must be in (0, 1] with sampler.noise_schedule=decay")
    if schedule == "table":
        table = knobs.get("noise_table")
        if table is None or not all(float(v) > 0 for v in table):
            p.append(f"sampler.noise_table ({table}) must list a multiplier > 0 per step with sampler.noise_schedule=table")

    window = knobs.get("window", "fixed")
    start, size = knobs.get("window_start", 0), knobs.get("window_size")
    if window not in WINDOWS:
        p.append(f"sampler.window ({window!r}) must be one of {WINDOWS}")
    if start < 0 or start >= n:
        p.append(f"sampler.window_start ({start}) must be in [0, sampler.num_steps={n})")
    elif start < start_step:
        p.append(f"sampler.window_start ({start}) must be >= sampler.start_step ({start_step}): steps before "
                 "the partial chain's start are not sampled")
    if size is not None and size < 1:
        p.append(f"sampler.window_size ({size}) must be >= 1 or null (all steps)")
    _only_for(p, knobs, "window_stride", "window", "sliding")
    _only_for(p, knobs, "window_every", "window", "sliding")
    _only_for(p, knobs, "window_start_max", "window", "random")
    if window in ("sliding", "random") and size is None:
        p.append(f"sampler.window_size must be set with sampler.window={window} (the window's length in steps)")
    if window == "sliding":
        if knobs.get("window_every") is None or knobs["window_every"] < 1:
            p.append(f"sampler.window_every ({knobs.get('window_every')}) must be >= 1 with sampler.window=sliding "
                     "(iterations between moves; MixGRPO moves every 25)")
        if knobs.get("window_stride") is not None and knobs["window_stride"] < 1:
            p.append(f"sampler.window_stride ({knobs['window_stride']}) must be >= 1")
    if window == "random" and knobs.get("window_start_max") is not None and knobs["window_start_max"] < start:
        p.append(f"sampler.window_start_max ({knobs['window_start_max']}) must be >= sampler.window_start ({start})")

    rate, bounds = knobs.get("calibration_rate"), knobs.get("calibration_bounds")
    if rate is not None and not rate > 0:
        p.append(f"sampler.calibration_rate ({rate}) must be > 0, or null to turn calibration off")
    if bounds is not None:
        if rate is None:
            p.append(f"sampler.calibration_bounds ({list(bounds)}) is only read when sampler.calibration_rate is set; "
                     "remove it or set a rate")
        elif len(bounds) != 2 or not 0 < bounds[0] <= 1 <= bounds[1] or math.isinf(bounds[1]):
            p.append(f"sampler.calibration_bounds ({list(bounds)}) must be [low, high] with 0 < low <= 1 <= high < inf")
    if knobs.get("reward_guidance_scale", 0.0) != 0 and knobs.get("reward_guidance") is None:
        p.append(f"sampler.reward_guidance_scale ({knobs['reward_guidance_scale']}) needs sampler.reward_guidance "
                 "(a differentiable reward on clean latents, e.g. {_target_: samplers.guidance.LatentTarget})")
    return p
