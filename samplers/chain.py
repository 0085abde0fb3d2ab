"""The rollout loop shared by every stochastic sampler: a chain of kernel steps with a window of noise.

A ``ChainSampler`` walks the policy's noise levels sigma_0 > ... > sigma_S. On the steps its plan
marks stochastic (samplers/schedule.py) it draws x_{j+1} ~ N(mean_j, std_j^2 I) from its kernel and
records the exact log-density; elsewhere it takes a deterministic step, first order (the kernel's own,
e.g. Euler) or the second-order multistep DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++"), which
MixGRPO-Flash uses outside its window. The training-time ``log_prob`` recomputes a stored step through
the same ``transition`` the rollout used, so the on-policy ratio is exactly 1.

Optional parts, each off by default:
  partial chains   ``start_step`` k > 0 starts at sigma_k from a forward-noised clean sample (``start``)
                   and runs only the rest of the chain (InstructVideo, Yuan et al. 2024).
  reward guidance  ``reward_guidance_scale * (sigma_j - sigma_{j+1}) * grad R(x0_hat_j)`` is added to
                   every step's mean, R a differentiable reward of the clean prediction (Euphonium's
                   process-reward gradient guidance). The gradient is treated as part of the sampler,
                   not of the policy: it is recomputed from the current policy's x0_hat at training time
                   (so the log-prob is the guided kernel's) but not differentiated through.
  calibration      per-step noise multipliers c_j updated from per-step reward gains after every
                   iteration (DenseGRPO's reward-aware exploration calibration, Deng et al. 2026; the
                   update rule is ours): c_j <- clip(c_j * exp(rate * (p_j - 1/2)), bounds), p_j the share
                   of samples whose clean-prediction reward rose over step j. Steps whose noise mostly
                   lowers the reward get less, steps where it mostly raises it get more. Saved and
                   restored with ``state_dict``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch

from samplers.base import Kernel, Plan, PredictFn, gaussian_log_prob, per_sample
from samplers.schedule import knob_problems, noise_multipliers, window_mask
from samplers.trajectory import Trajectory

DEFAULT_CALIBRATION_BOUNDS = (0.25, 4.0)


@dataclass(kw_only=True)
class ChainSampler:
    """A stochastic sampler over one ``kernel``; its knobs are documented in conf/sampler/*.yaml.

    Subclasses only choose the kernel (FlowSDESampler, DanceSDESampler, CPSSampler, DDIMSampler).
    Raises ValueError at construction listing every knob rule broken (samplers/schedule.py).
    """

    kernel: ClassVar[Kernel]

    noise_level: float = 0.7
    noise_schedule: str = "constant"
    noise_decay: float | None = None
    noise_table: list[float] | None = None
    window: str = "fixed"
    window_start: int = 0
    window_size: int | None = None
    window_stride: int | None = None
    window_every: int | None = None
    window_start_max: int | None = None
    log_prob_reduction: str = "mean"
    ode_solver: str = "euler"
    start_step: int = 0
    calibration_rate: float | None = None
    calibration_bounds: list[float] | None = None
    reward_guidance: object | None = None
    reward_guidance_scale: float = 0.0
    num_steps: int = 10
    eval_num_steps: int = 10
    guidance_scale: float = 4.5
    _calibration: list[float] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # Hydra hands lists over as ListConfig: plain floats keep the arithmetic and the state plain.
        if self.noise_table is not None:
            self.noise_table = [float(v) for v in self.noise_table]
        if self.calibration_bounds is not None:
            self.calibration_bounds = [float(v) for v in self.calibration_bounds]
        problems = self.problems(self.knobs())
        if problems:
            raise ValueError("invalid sampler knobs:\n  - " + "\n  - ".join(problems))
        if self.calibration_rate is not None:
            self._calibration = [1.0] * self.num_steps

    @classmethod
    def problems(cls, knobs: dict) -> list[str]:
        """Knob rules, including this kernel's range of noise levels (used by trainer/config.validate)."""
        p = knob_problems(knobs)
        top = knobs.get("noise_level", 0.0)
        if knobs.get("calibration_rate") is not None:
            top *= (knobs.get("calibration_bounds") or DEFAULT_CALIBRATION_BOUNDS)[1]
        if top > cls.kernel.max_noise_level:
            p.append(f"sampler.noise_level ({knobs['noise_level']}), times the largest calibration multiplier if "
                     f"calibration is on, must be <= {cls.kernel.max_noise_level} for {cls.__name__}")
        return p

    def knobs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @property
    def needs_step_rewards(self) -> bool:
        return self.calibration_rate is not None

    # ------------------------------------------------------------------------------ the plan
    def plan(self, sigmas: torch.Tensor, iteration: int = 0, generator: torch.Generator | None = None) -> Plan:
        """Stochastic steps and their noise levels for one iteration of a chain over ``sigmas`` [S+1].

        A pure function of (knobs, calibration state, iteration, generator state).
        """
        S = sigmas.numel() - 1
        # Also the kernel's check that the schedule is one it can use (raises ValueError otherwise).
        feasible = self.kernel.can_be_stochastic(sigmas.float().cpu()) & (torch.arange(S) >= self.start_step)
        if self.noise_level == 0:
            return Plan(torch.zeros(S, dtype=torch.bool), torch.zeros(S))
        mask = window_mask(
            feasible, self.window, self.window_start, self.window_size, self.window_stride or 1, self.window_every,
            self.window_start_max, iteration, generator,
        )
        m = noise_multipliers(self.noise_schedule, S, self.noise_decay, self.noise_table)
        c = self._calibration if self._calibration is not None else [1.0] * S
        if len(c) != S:
            raise ValueError(f"the calibrated noise table has {len(c)} steps but this chain has {S} (sampler.num_steps)")
        etas = [self.noise_level * m[j] * c[j] if mask[j] else 0.0 for j in range(S)]
        if max(etas) > self.kernel.max_noise_level:
            raise ValueError(f"noise level {max(etas)} exceeds {self.kernel.max_noise_level}, the largest "
                             f"{type(self).__name__} is defined for; lower sampler.noise_level or the schedule")
        # fp32 once: rollout and recomputation read the same stored value (trajectory.noise_levels).
        return Plan(mask, torch.tensor(etas, dtype=torch.float32))

    # --------------------------------------------------------------------------- the steps
    def _guidance_shift(self, x0: torch.Tensor, sigmas: torch.Tensor, j: int, prompt_ids: torch.Tensor | None) -> torch.Tensor:
        """scale * (sigma_j - sigma_{j+1}) * grad_x0 R(x0, sigma_j, prompt_ids), fp32, detached."""
        with torch.enable_grad():
            leaf = x0.detach().float().requires_grad_(True)
            reward = self.reward_guidance(leaf, sigmas[:, j], prompt_ids)
            (grad,) = torch.autograd.grad(reward.sum(), leaf)
        step = per_sample(sigmas[:, j] - sigmas[:, j + 1], x0)
        return self.reward_guidance_scale * step * grad

    def transition(
        self, x: torch.Tensor, out: torch.Tensor, sigmas: torch.Tensor, j: int, eta: float,
        prompt_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of stochastic step j: the one arithmetic path for rollout and training.
        ``prompt_ids`` [B] reach the reward guidance (a prompt-aware reward needs them)."""
        mean, std = self.kernel.transition(x, out, sigmas, j, eta)
        if self.reward_guidance_scale != 0:
            mean = mean + self._guidance_shift(self.kernel.clean(x, out, sigmas[:, j]), sigmas, j, prompt_ids)
        return mean, std

    def deterministic_step(
        self, x: torch.Tensor, out: torch.Tensor, x0: torch.Tensor, sigmas: torch.Tensor, j: int,
        prev_x0: torch.Tensor | None, prompt_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_{j+1} of a deterministic step (the kernel's first-order step, or DPM-Solver++(2M))."""
        if self.ode_solver == "euler":
            x_next = self.kernel.transition(x, out, sigmas, j, 0.0)[0]
        else:
            x_next = dpm_solver_2m(self.kernel, x, x0, prev_x0, sigmas, j)
        if self.reward_guidance_scale != 0:
            x_next = x_next + self._guidance_shift(x0, sigmas, j, prompt_ids)
        return x_next

    # --------------------------------------------------------------------------- rollout
    def start(self, x0: torch.Tensor, sigmas: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The partial chain's first state: x0 forward-noised to sigmas[start_step]. x0, noise [B, *L]."""
        alpha, s = self.kernel.alpha_sigma(sigmas[self.start_step].float().reshape(1))
        return alpha * x0.float() + s * noise.float()

    @torch.no_grad()
    def rollout(
        self,
        predict_fn: PredictFn,
        x_T: torch.Tensor,
        sigmas: torch.Tensor,
        cond: object,
        generators: Sequence[torch.Generator],
        prompt_ids: torch.Tensor,
        sample_ids: torch.Tensor,
        plan: Plan | None = None,
    ) -> Trajectory:
        """Sample B trajectories.

        Args:
          x_T: [B, *L] the state at sigmas[start_step]: initial noise (drawn by the caller from the same
            per-sample generators), or ``start(x0, sigmas, noise)`` for a partial chain.
          sigmas: [S+1] the whole chain's decreasing noise levels; the trajectory covers
            sigmas[start_step:].
          generators: one per sample, so each sample's noise depends only on its own seed and not
            on the batch it happens to share (bitwise identical on 1 or N processes).
          plan: this iteration's plan (default: ``plan(sigmas)``, iteration 0).
        Returns a Trajectory of S - start_step steps.
        """
        B = x_T.shape[0]
        if len(generators) != B:
            raise ValueError(f"rollout needs one generator per sample: got {len(generators)} for batch {B}")
        plan = plan if plan is not None else self.plan(sigmas)
        k = self.start_step
        sig = sigmas[k:].float().unsqueeze(0).expand(B, -1).contiguous()
        stochastic, etas = plan.stochastic[k:], plan.noise_levels[k:]
        x = x_T.float()
        latents, log_probs, pred_x0 = [x], [], []
        prev_x0 = None
        for j in range(sig.shape[1] - 1):
            out = predict_fn(x, sig[:, j], cond).float()
            x0 = self.kernel.clean(x, out, sig[:, j])
            if stochastic[j]:
                mean, std = self.transition(x, out, sig, j, float(etas[j]), prompt_ids)
                eps = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]).to(x.device)
                x = mean + per_sample(std, x) * eps
                log_probs.append(gaussian_log_prob(x, mean, std, self.log_prob_reduction))
            else:
                x = self.deterministic_step(x, out, x0, sig, j, prev_x0, prompt_ids)
                log_probs.append(torch.zeros(B, device=x.device))
            prev_x0 = x0
            pred_x0.append(x0)
            latents.append(x)
        return Trajectory(
            latents=torch.stack(latents, 1),
            log_probs=torch.stack(log_probs, 1),
            pred_x0=torch.stack(pred_x0, 1),
            sigmas=sig,
            stochastic=stochastic.unsqueeze(0).expand(B, -1).to(x.device),
            noise_levels=etas.unsqueeze(0).expand(B, -1).to(x.device),
            prompt_ids=prompt_ids,
            sample_ids=sample_ids,
        )

    def log_prob(
        self, predict_fn: PredictFn, traj: Trajectory, j: int, cond: object
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Recompute step j's log-prob of the stored transition under ``predict_fn`` (with grad).

        Uses exactly the rollout's arithmetic (and the noise level stored in the trajectory), so
        before any update the ratio is exactly 1.
        Returns (log_prob [B], mean [B, *L], std [B]).
        """
        if not bool(traj.stochastic[0, j]):
            raise ValueError(f"step {j} was deterministic in this trajectory; only stochastic steps have a log-prob")
        x = traj.latents[:, j]
        out = predict_fn(x, traj.sigmas[:, j], cond).float()
        # The rollout passed this step's eta as a Python float read from the same fp32 value; reading it
        # back here (one scalar, a device sync on GPU like the check above) keeps the arithmetic identical.
        mean, std = self.transition(x, out, traj.sigmas, j, float(traj.noise_levels[0, j]), traj.prompt_ids)
        return gaussian_log_prob(traj.latents[:, j + 1], mean, std, self.log_prob_reduction), mean, std

    def kl_std(self, traj: Trajectory, j: int, std: torch.Tensor, convention: str) -> torch.Tensor:
        """[B] the scale of the KL term to the reference at step j, for a transition std ``std`` [B].

        "exact": the transition std itself (the true KL of two Gaussians with equal std). "flow_grpo":
        Flow-GRPO's std_t, the kernel's diffusion scale without the sqrt(sigma_j - sigma_{j+1}) factor
        that kernels whose std is std_t sqrt(dt) carry (flow_sde, dance_sde); CPS and DDIM write their
        std without that factor, so there both conventions are the same number.
        """
        if convention == "exact" or not self.kernel.std_carries_sqrt_dt:
            return std
        if convention != "flow_grpo":
            raise ValueError(f"algorithm.kl_convention must be 'flow_grpo' or 'exact', got {convention!r}")
        return std / torch.sqrt((traj.sigmas[:, j] - traj.sigmas[:, j + 1]).float())

    # --------------------------------------------------------------------- evaluation, state
    def evaluation(self) -> "ChainSampler":
        """The deterministic sampler of the same family for evaluation: eval_num_steps, no noise, the
        same ODE solver, no guidance by a reward, the whole chain."""
        return type(self)(
            noise_level=0.0, num_steps=self.eval_num_steps, eval_num_steps=self.eval_num_steps,
            guidance_scale=self.guidance_scale, log_prob_reduction=self.log_prob_reduction, ode_solver=self.ode_solver,
        )

    def calibrate(self, positive_fraction: torch.Tensor) -> None:
        """Update the per-step noise multipliers from [S] shares of samples whose reward rose over each
        step (NaN where a step was not measured). The same values must reach every rank."""
        if self._calibration is None:
            raise ValueError("calibrate() needs sampler.calibration_rate to be set")
        lo, hi = self.calibration_bounds or DEFAULT_CALIBRATION_BOUNDS
        for j, p in enumerate(positive_fraction.tolist()):
            if not math.isnan(p):
                self._calibration[j] = min(hi, max(lo, self._calibration[j] * math.exp(self.calibration_rate * (p - 0.5))))

    def state_dict(self) -> dict:
        """JSON-serialisable state (floats round-trip exactly through JSON): the calibration multipliers."""
        return {} if self._calibration is None else {"noise_scale": list(self._calibration)}

    def load_state_dict(self, state: dict) -> None:
        if self._calibration is None:
            if state:
                raise ValueError(f"checkpoint holds sampler state {sorted(state)} but calibration is off in this config")
            return
        scale = [float(v) for v in state["noise_scale"]]
        if len(scale) != self.num_steps:
            raise ValueError(f"checkpoint's calibrated noise table has {len(scale)} steps, sampler.num_steps is {self.num_steps}")
        self._calibration = scale


def dpm_solver_2m(
    kernel: Kernel, x: torch.Tensor, x0: torch.Tensor, prev_x0: torch.Tensor | None, sigmas: torch.Tensor, j: int
) -> torch.Tensor:
    """One DPM-Solver++(2M) step (midpoint form) from sigmas[:, j] to sigmas[:, j+1], fp32.

    With lambda = log(alpha / s), h = lambda_{j+1} - lambda_j and r = (lambda_j - lambda_{j-1}) / h:
        D = x0_j + (x0_j - x0_{j-1}) / (2 r)
        x_{j+1} = (s_{j+1} / s_j) x_j - alpha_{j+1} (exp(-h) - 1) D
    First order (D = x0_j) at the first step of the chain and at the last one (sigma_{j+1} = 0 or the
    end), as diffusers' DPMSolverMultistepScheduler does. The first-order form equals the kernel's own
    deterministic step (Euler for flow matching, DDIM for VP) up to rounding.
    """
    a_s, s_s = kernel.alpha_sigma(sigmas[:, j])
    a_t, s_t = kernel.alpha_sigma(sigmas[:, j + 1])
    lam_s, lam_t = torch.log(a_s) - torch.log(s_s), torch.log(a_t) - torch.log(s_t)
    h = lam_t - lam_s
    coef = per_sample(a_t * (torch.exp(-h) - 1.0), x)
    ratio = per_sample(s_t / s_s, x)
    last = j == sigmas.shape[1] - 2
    if prev_x0 is None or last:
        return ratio * x - coef * x0
    a_p, s_p = kernel.alpha_sigma(sigmas[:, j - 1])
    r = per_sample((lam_s - (torch.log(a_p) - torch.log(s_p))) / h, x)
    d1 = (1.0 / r) * (x0 - prev_x0)
    return ratio * x - coef * x0 - 0.5 * coef * d1
