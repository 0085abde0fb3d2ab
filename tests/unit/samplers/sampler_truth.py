"""Closed-form ground truth for the sampler tests: a 2-D Gaussian mixture's exact velocity (flow matching)
and exact epsilon (VP diffusion), its exact distribution, and goodness-of-fit checks against it.

Layout: a batch of B "samples" of shape [2, N]; every column is an independent 2-D point, so B * N
points are drawn with only B generators (one per sample, as the samplers require).

Derivation. Component k: x0 ~ N(mu_k, diag(s_k^2)). Flow matching x_t = (1 - t) x0 + t eps, so given k,
(x_t, eps - x0) is jointly Gaussian with E[x_t] = (1 - t) mu_k, Var[x_t] = (1 - t)^2 s_k^2 + t^2 =: C_k and
Cov[eps - x0, x_t] = t - (1 - t) s_k^2, hence
    E[v | x_t = x, k] = -mu_k + (t - (1 - t) s_k^2) / C_k * (x - (1 - t) mu_k),
and the exact velocity is the posterior-weighted sum, weights w_k(x) ∝ pi_k N(x; (1 - t) mu_k, C_k).
VP: x = a x0 + s eps with a = sqrt(1 - s^2): E[eps | x, k] = s (x - a mu_k) / (a^2 s_k^2 + s^2), same weights
with mean a mu_k and variance a^2 s_k^2 + s^2.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats

WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
MEANS = torch.tensor([[-2.0, 0.5], [2.0, 1.5], [0.5, -2.5]], dtype=torch.float64)  # [K, 2]
STDS = torch.tensor([[0.5, 0.8], [0.7, 0.4], [0.3, 0.3]], dtype=torch.float64)  # [K, 2]


def sample_data(batch: int, n: int, seed: int) -> torch.Tensor:
    """[batch, 2, n] exact draws from the mixture."""
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(WEIGHTS, batch * n, replacement=True, generator=g)
    z = torch.randn(batch * n, 2, generator=g, dtype=torch.float64)
    pts = MEANS[k] + STDS[k] * z
    return pts.reshape(batch, n, 2).transpose(1, 2).float()


def _posterior_mix(x: torch.Tensor, scale: torch.Tensor, noise_var: torch.Tensor, per_component) -> torch.Tensor:
    """sum_k w_k(x) * per_component(k, mean_k, var_k) for x [B, 2, N] with x | k ~ N(scale mu_k, scale^2 s_k^2 + noise_var)."""
    x = x.double()
    scale, noise_var = scale.double().reshape(-1, 1, 1), noise_var.double().reshape(-1, 1, 1)
    logw, parts = [], []
    for k in range(len(WEIGHTS)):
        mean = scale * MEANS[k].reshape(1, 2, 1)
        var = scale**2 * STDS[k].reshape(1, 2, 1) ** 2 + noise_var
        logw.append(math.log(WEIGHTS[k]) - 0.5 * (((x - mean) ** 2) / var + torch.log(2 * math.pi * var)).sum(1))
        parts.append(per_component(k, x - mean, var))
    w = torch.softmax(torch.stack(logw), 0).unsqueeze(2)  # [K, B, 1, N]
    return (w * torch.stack(parts)).sum(0)


def flow_velocity(x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
    """The exact E[eps - x0 | x_t = x] at t = sigma [B] (float64)."""
    t = sigma.double().reshape(-1, 1, 1)

    def part(k, centred, var):
        return -MEANS[k].reshape(1, 2, 1) + (t - (1 - t) * STDS[k].reshape(1, 2, 1) ** 2) / var * centred

    return _posterior_mix(x, 1 - sigma, sigma**2, part)


def vp_epsilon(x: torch.Tensor, s: torch.Tensor, cond=None) -> torch.Tensor:
    """The exact E[eps | x] for x = sqrt(1 - s^2) x0 + s eps, s [B] (float64)."""
    ss = s.double().reshape(-1, 1, 1)
    return _posterior_mix(x, (1 - s.double() ** 2).sqrt(), s.double() ** 2, lambda k, centred, var: ss * centred / var)


# Projections the goodness-of-fit checks look along: the axes and two diagonals.
DIRECTIONS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, -0.6]], dtype=torch.float64)


def _projected_cdf(u: torch.Tensor):
    means = (MEANS @ u).numpy()
    stds = np.sqrt(((STDS**2) @ (u**2)).numpy())
    weights = WEIGHTS.numpy()
    return lambda z: sum(w * stats.norm.cdf(z, m, s) for w, m, s in zip(weights, means, stds))


def fit_report(samples: torch.Tensor, seed: int = 123) -> dict[str, float]:
    """Goodness of fit of samples [B, 2, N] to the mixture.

    Returns the smallest p-value of one-sample KS tests against the exact CDF of each projection
    (``ks_exact``), of two-sample KS tests against as many fresh exact draws (``ks_two_sample``), and the
    largest error of the mean (in units of the data's std) and of the covariance (relative to the
    largest variance) (``mean_err``, ``cov_err``).
    """
    pts = samples.transpose(1, 2).reshape(-1, 2).double()
    fresh = sample_data(samples.shape[0], samples.shape[2], seed).transpose(1, 2).reshape(-1, 2).double()
    p_exact, p_two = [], []
    for u in DIRECTIONS:
        proj = (pts @ u).numpy()
        p_exact.append(stats.kstest(proj, _projected_cdf(u)).pvalue)
        p_two.append(stats.ks_2samp(proj, (fresh @ u).numpy()).pvalue)
    mean = WEIGHTS @ MEANS
    second = (WEIGHTS[:, None, None] * (torch.diag_embed(STDS**2) + MEANS[:, :, None] * MEANS[:, None, :])).sum(0)
    cov = second - mean[:, None] * mean[None, :]
    centred = pts - pts.mean(0)
    emp_cov = centred.T @ centred / (len(pts) - 1)
    return {
        "ks_exact": min(p_exact),
        "ks_two_sample": min(p_two),
        "mean_err": float(((pts.mean(0) - mean).abs() / cov.diagonal().sqrt()).max()),
        "cov_err": float((emp_cov - cov).abs().max() / cov.diagonal().max()),
    }
