"""Every sampler, run with the exact velocity (or epsilon) of a 2-D Gaussian mixture, draws that mixture:
one-sample KS tests against its exact projected CDFs, two-sample KS tests against fresh draws, and its
mean and covariance. The same checks fail when a drift is deliberately wrong."""
from __future__ import annotations

import math

import pytest
import torch

from sampler_truth import fit_report, flow_velocity, sample_data, vp_epsilon
from samplers.cps import CPSSampler
from samplers.dance_sde import DanceSDESampler
from samplers.ddim import DDIMSampler
from samplers.flow_sde import FlowSDESampler
from samplers.ode import ODESampler

B, N, STEPS = 4, 1500, 100  # 6000 points; ~0.1-0.3 s per rollout
# Measured p-values of the correct samplers: 0.06-0.6 (exact-CDF KS); of the wrong drifts below: < 1e-6.
P_MIN, MEAN_TOL, COV_TOL = 1e-3, 0.05, 0.05

FLOW = {
    "flow_sde": lambda: FlowSDESampler(noise_level=0.7),
    "dance_sde": lambda: DanceSDESampler(noise_level=0.7),
    # CPS keeps the marginals only approximately for an exact (posterior-mean) denoiser, the better the
    # smaller eta; see test_cps_keeps_the_marginals_exactly_when_the_denoiser_is_exact.
    "cps": lambda: CPSSampler(noise_level=0.3),
    "ode_euler": lambda: ODESampler(),
    "ode_dpm2": lambda: ODESampler(ode_solver="dpm2"),
    "flow_sde_window_dpm2": lambda: FlowSDESampler(
        noise_level=0.7, window_start=30, window_size=20, ode_solver="dpm2", num_steps=STEPS),
}
VP = {
    "ddim_eta1": lambda: DDIMSampler(noise_level=1.0),
    "ddim_eta0": lambda: DDIMSampler(noise_level=0.0),
    "ddim_eta0_dpm2": lambda: DDIMSampler(noise_level=0.0, ode_solver="dpm2"),
}


def flow_sigmas(steps=STEPS):
    return torch.linspace(1.0, 0.0, steps + 1)


def vp_sigmas(steps=STEPS):
    # A cosine schedule: s = sqrt(1 - abar) from ~1 down to 0.
    return torch.sin(math.pi / 2 * torch.linspace(0.995, 0.0, steps + 1))


def rollout(sampler, vp: bool, predict=None, seed=1000):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(B)]
    noise = torch.stack([torch.randn(2, N, generator=g) for g in gens])
    if vp:
        # The chain starts at s_0 < 1: the exact start is the data forward-noised to s_0.
        sigmas, x_T, predict = vp_sigmas(), sampler.start(sample_data(B, N, 77), vp_sigmas(), noise), predict or vp_epsilon
    else:
        sigmas, x_T, predict = flow_sigmas(), noise, predict or flow_velocity
    return sampler.rollout(predict, x_T, sigmas, None, gens, torch.zeros(B, dtype=torch.long), torch.arange(B))


def assert_fits(report):
    assert report["ks_exact"] > P_MIN and report["ks_two_sample"] > P_MIN, report
    assert report["mean_err"] < MEAN_TOL and report["cov_err"] < COV_TOL, report


@pytest.mark.parametrize("name", sorted(FLOW) + sorted(VP))
def test_samples_follow_the_data_distribution(name):
    vp = name in VP
    sampler = (VP if vp else FLOW)[name]()
    traj = rollout(sampler, vp)
    assert_fits(fit_report(traj.final))
    if "eta0" in name or name.startswith("ode"):
        assert not bool(traj.stochastic.any())
    elif "window" in name:
        assert traj.stochastic[0].nonzero().flatten().tolist() == list(range(30, 50))
    else:
        # Every step that can carry noise did: all but the last for CPS and for DDIM into abar = 1.
        assert int(traj.stochastic[0].sum()) == STEPS - (1 if vp or name == "cps" else 0)


class WrongDrift:
    """The kernel's mean moved part of the way back to its deterministic step: the noise-dependent
    drift correction scaled by ``factor`` (0 drops it), the std unchanged."""

    def __init__(self, kernel, factor):
        self.kernel, self.factor = kernel, factor

    def __getattr__(self, name):
        return getattr(self.kernel, name)

    def transition(self, x, out, sigmas, j, eta):
        det, _ = self.kernel.transition(x, out, sigmas, j, 0.0)
        mean, std = self.kernel.transition(x, out, sigmas, j, eta)
        return det + self.factor * (mean - det), std


@pytest.mark.parametrize("factor", [0.0, 0.5])
@pytest.mark.parametrize("name", ["flow_sde", "dance_sde", "cps", "ddim_eta1"])
def test_a_wrong_drift_fails_the_same_checks(monkeypatch, name, factor):
    vp = name in VP
    sampler = (VP if vp else FLOW)[name]()
    monkeypatch.setattr(type(sampler), "kernel", WrongDrift(type(sampler).kernel, factor))
    report = fit_report(rollout(sampler, vp).final)
    assert report["ks_exact"] < 1e-5, report


def test_a_wrong_velocity_fails_the_ode_checks():
    report = fit_report(rollout(ODESampler(), False, predict=lambda x, s, c: 1.1 * flow_velocity(x, s)).final)
    assert report["ks_exact"] < 1e-6, report


def test_the_marginal_holds_at_every_noise_level():
    """Not only the end: x_j follows the data forward-noised to sigma_j (exact draws), mid-chain."""
    traj = rollout(FLOW["flow_sde"](), False)
    for j in (40, 70):
        t = float(traj.sigmas[0, j])
        x0, eps = sample_data(B, N, 5), torch.randn(B, 2, N, generator=torch.Generator().manual_seed(6))
        expected = (1 - t) * x0 + t * eps
        from scipy import stats

        for d in range(2):
            p = stats.ks_2samp(traj.latents[:, j, d].flatten().numpy(), expected[:, d].flatten().numpy()).pvalue
            assert p > P_MIN, (j, d, p)


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_cps_keeps_the_marginals_exactly_when_the_denoiser_is_exact(eta):
    """Data = one point c: x0_hat = c and eps_hat are exact, and CPS's x_j is exactly N((1 - s_j) c, s_j^2)
    at any eta and any step count (its defining property). The eta=1 case is where a wrong cos/sin
    coefficient would show most."""
    c = torch.tensor([1.5, -0.5]).reshape(1, 2, 1)

    def velocity(x, sigma, cond):
        t = sigma.reshape(-1, 1, 1)
        return (x - (1 - t) * c) / t - c

    gens = [torch.Generator().manual_seed(i) for i in range(B)]
    x_T = torch.stack([torch.randn(2, N, generator=g) for g in gens])
    traj = CPSSampler(noise_level=eta).rollout(
        velocity, x_T, flow_sigmas(8), None, gens, torch.zeros(B, dtype=torch.long), torch.arange(B))
    for j in (3, 6, 7):
        s = float(traj.sigmas[0, j])
        z = (traj.latents[:, j] - (1 - s) * c) / s  # standard normal if the marginal is exact
        assert z.mean().abs() < 0.03 and (z.std() - 1).abs() < 0.02, (j, float(z.mean()), float(z.std()))
    torch.testing.assert_close(traj.final, c.expand_as(traj.final), rtol=0, atol=1e-5)
