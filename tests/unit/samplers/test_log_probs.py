"""Per-step log-probs of every stochastic sampler against an independently computed Gaussian density (the
paper's formulas written out in float64), and the whole-trajectory log-density against sampling
frequency in 1-D."""
from __future__ import annotations

import math

import pytest
import torch

import samplers.chain as chain
from samplers.cps import CPSSampler
from samplers.dance_sde import DanceSDESampler
from samplers.ddim import DDIMSampler
from samplers.flow_sde import FlowSDESampler
from samplers.guidance import LatentTarget


def _flow_sde(x, v, t, t_next, eta, cap):
    dt = t_next - t
    std_t = eta * math.sqrt(t / (1 - (cap if t == 1.0 else t)))
    return x + (v + std_t**2 / (2 * t) * (x + (1 - t) * v)) * dt, std_t * math.sqrt(-dt)


def _dance(x, v, t, t_next, eta, cap):
    dt = t_next - t
    return x + (v + eta**2 / (2 * t) * (x + (1 - t) * v)) * dt, eta * math.sqrt(-dt)


def _cps(x, v, t, t_next, eta, cap):
    x0, eps = x - t * v, x + (1 - t) * v
    std = t_next * math.sin(eta * math.pi / 2)
    return (1 - t_next) * x0 + math.sqrt(t_next**2 - std**2) * eps, std


def _ddim(x, eps, s, s_next, eta, cap):
    abar, abar_next = 1 - s**2, 1 - s_next**2
    x0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    std = eta * math.sqrt((1 - abar_next) / (1 - abar)) * math.sqrt(1 - abar / abar_next)
    return math.sqrt(abar_next) * x0 + math.sqrt(1 - abar_next - std**2) * eps, std


def _clean_flow(x, v, t):
    return x - t * v


def _clean_vp(x, eps, s):
    return (x - s * eps) / math.sqrt(1 - s**2)


# name: (sampler class, reference step, clean prediction, schedule [S+1])
CASES = {
    "flow_sde": (FlowSDESampler, _flow_sde, _clean_flow, torch.tensor([1.0, 0.9, 0.7, 0.45, 0.2, 0.05])),
    "dance_sde": (DanceSDESampler, _dance, _clean_flow, torch.tensor([1.0, 0.9, 0.7, 0.45, 0.2, 0.05])),
    "cps": (CPSSampler, _cps, _clean_flow, torch.tensor([1.0, 0.9, 0.7, 0.45, 0.2, 0.05])),
    "ddim": (DDIMSampler, _ddim, _clean_vp, torch.tensor([0.995, 0.9, 0.7, 0.45, 0.2, 0.05])),
}
B, SHAPE = 3, (2, 3, 3)


def model(x, sigma, cond):
    """A fixed nonlinear stand-in for a network: the output depends on x and sigma."""
    w = torch.linspace(-1, 1, x[0].numel()).reshape(x.shape[1:])
    return torch.tanh(x * w + sigma.reshape(-1, 1, 1, 1)) - 0.3 * x


def _reference_log_prob(name, traj, j, eta, guidance=0.0, target=1.0):
    """sum over elements of log N(x_{j+1}; mean_j, std_j^2), from the formulas above, float64."""
    _, step, clean, _ = CASES[name]
    out = []
    for b in range(traj.latents.shape[0]):
        x = traj.latents[b, j].double()
        t, t_next, cap = (float(traj.sigmas[b, i]) for i in (j, j + 1, 1))
        pred = model(traj.latents[b : b + 1, j], traj.sigmas[b : b + 1, j], None)[0].double()
        mean, std = step(x, pred, t, t_next, eta, cap)
        if guidance:
            x0 = clean(x, pred, t)
            mean = mean + guidance * (t - t_next) * (-2 * (x0 - target) / x0.numel())  # grad of LatentTarget
        out.append(torch.distributions.Normal(mean, std).log_prob(traj.latents[b, j + 1].double()).sum())
    return torch.stack(out)


def _rollout(sampler, sigmas, seed=0):
    gens = [torch.Generator().manual_seed(seed + b) for b in range(B)]
    x_T = torch.stack([torch.randn(SHAPE, generator=g) for g in gens])
    return sampler.rollout(model, x_T, sigmas, None, gens, torch.zeros(B, dtype=torch.long), torch.arange(B))


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_step_log_prob_is_the_gaussian_density(name):
    cls, _, _, sigmas = CASES[name]
    eta = 0.6
    sampler = cls(noise_level=eta, log_prob_reduction="sum", num_steps=5)
    traj = _rollout(sampler, sigmas)
    stochastic = traj.stochastic[0].nonzero().flatten().tolist()
    assert stochastic == [0, 1, 2, 3, 4]  # the schedule ends above 0: every step can carry noise
    for j in stochastic:
        torch.testing.assert_close(traj.log_probs[:, j].double(), _reference_log_prob(name, traj, j, eta), rtol=2e-5, atol=2e-3)
    # "mean" is the same density divided by the number of elements.
    mean_traj = _rollout(cls(noise_level=eta, log_prob_reduction="mean", num_steps=5), sigmas)
    torch.testing.assert_close(mean_traj.log_probs, traj.log_probs / math.prod(SHAPE), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["flow_sde", "ddim"])
def test_scheduled_and_guided_steps_use_their_own_noise_level_and_mean(name):
    """A decaying schedule gives step j eta * decay^j; reward guidance moves the mean by
    scale * (sigma_j - sigma_{j+1}) * grad R(x0_hat_j); the log-prob is that of the moved mean."""
    cls, _, _, sigmas = CASES[name]
    sampler = cls(noise_level=0.8, noise_schedule="decay", noise_decay=0.7, log_prob_reduction="sum", num_steps=5,
                  window_start=1, window_size=3, reward_guidance=LatentTarget(1.0), reward_guidance_scale=2.0)
    traj = _rollout(sampler, sigmas, seed=5)
    assert traj.stochastic[0].tolist() == [False, True, True, True, False]
    for j in (1, 2, 3):
        eta = 0.8 * 0.7**j
        assert float(traj.noise_levels[0, j]) == pytest.approx(eta, rel=1e-6)
        torch.testing.assert_close(
            traj.log_probs[:, j].double(), _reference_log_prob(name, traj, j, eta, guidance=2.0), rtol=2e-5, atol=2e-3)
        # The unguided density of the same transition is measurably different: the guidance is really in it.
        assert (traj.log_probs[:, j].double() - _reference_log_prob(name, traj, j, eta)).abs().max() > 1e-2


# ---------------------------------------------------------------- 1-D: density against frequency
# A path x_1, x_2, x_3 from a fixed x_0, every step stochastic, has density p = exp(sum_j log_prob_j).
# For any box A in path space, E[1{path in A} / p(path)] = volume(A): the log-probs summed over a
# whole trajectory must agree with how often the sampler actually lands in A.
PATH_SIGMAS = {"flow": torch.tensor([0.8, 0.6, 0.4, 0.2]), "vp": torch.tensor([0.8, 0.6, 0.4, 0.2])}


def _path_volume_ratio(sampler, n=20000):
    gens = [torch.Generator().manual_seed(10_000 + i) for i in range(n)]
    x_T = torch.full((n, 1), 0.3)
    traj = sampler.rollout(
        lambda x, s, c: torch.tanh(2 * x) - s.reshape(-1, 1), x_T, PATH_SIGMAS["flow"], None, gens,
        torch.zeros(n, dtype=torch.long), torch.arange(n),
    )
    assert bool(traj.stochastic.all())
    # The box is taken on the increments x_j - x_{j-1}, a volume-preserving change of coordinates (unit
    # Jacobian) in which the path's coordinates are nearly independent, so 1/p stays moderate inside it.
    steps = traj.latents[:, :, 0].double().diff(dim=1)  # [n, 3]
    centre, half = steps.median(0).values, steps.std(0)
    inside = ((steps - centre).abs() <= half).all(1)
    estimate = (inside.double() * torch.exp(-traj.log_probs.double().sum(1))).mean()
    return float(estimate / (2 * half).prod())


@pytest.mark.parametrize("cls, eta", [(FlowSDESampler, 0.7), (DanceSDESampler, 0.5), (CPSSampler, 0.6), (DDIMSampler, 0.8)])
def test_trajectory_log_prob_matches_sampling_frequency(cls, eta):
    # 20000 paths, ~30% inside the box: the estimate's standard error is ~1.5%.
    assert _path_volume_ratio(cls(noise_level=eta, log_prob_reduction="sum")) == pytest.approx(1.0, abs=0.06)


def test_frequency_check_catches_a_wrong_density(monkeypatch):
    """The same estimate with the recorded log-prob using a 25% wider std is far from 1."""
    right = chain.gaussian_log_prob
    monkeypatch.setattr(chain, "gaussian_log_prob", lambda x, mean, std, red: right(x, mean, 1.25 * std, red))
    assert abs(_path_volume_ratio(FlowSDESampler(noise_level=0.7, log_prob_reduction="sum")) - 1.0) > 0.2
