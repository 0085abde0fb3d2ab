"""Flow-SDE sampler against ground truth: Gaussian densities, the written-out formula, and a data
distribution whose exact velocity field and marginals are known in closed form."""
from __future__ import annotations

import math

import pytest
import torch

import samplers.flow_sde as flow_sde
from models.sd3 import SD3Policy
from samplers.flow_sde import FlowSDESampler, gaussian_log_prob, sde_transition
from samplers.trajectory import Trajectory
from trainer.rollout import rollout_chunks
from trainer.rng import generator

# ----------------------------------------------------------------------------- gaussian_log_prob


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_log_prob_is_the_normal_density(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 5, generator=g, dtype=dtype)
    mean = torch.randn(3, 2, 4, 5, generator=g, dtype=dtype)
    std = torch.tensor([0.3, 1.0, 2.5], dtype=dtype)  # one scale per sample, all different
    ref = torch.distributions.Normal(mean, std.reshape(-1, 1, 1, 1)).log_prob(x).flatten(1).sum(1)
    tol = dict(rtol=1e-6, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-10)
    total = gaussian_log_prob(x, mean, std, "sum")
    assert total.shape == (3,)
    torch.testing.assert_close(total, ref, **tol)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std, "mean"), ref / (2 * 4 * 5), **tol)


def test_gaussian_log_prob_rejects_unknown_reduction():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="'sum' or 'mean'"):
        gaussian_log_prob(x, x, torch.ones(2), "none")


# ------------------------------------------------------------------------------- sde_transition


def _reference_transition(x, v, sigma, sigma_next, eta, sigma_cap):
    """Flow-GRPO's step written out sample by sample in float64 Python scalars / tensors."""
    means, stds = [], []
    for b in range(x.shape[0]):
        t, t_next, cap = float(sigma[b]), float(sigma_next[b]), float(sigma_cap[b])
        dt = t_next - t
        one_minus_t = 1.0 - (cap if t == 1.0 else t)  # std_t is infinite at t = 1: use the cap there
        std_t = eta * math.sqrt(t / one_minus_t)
        xb, vb = x[b].double(), v[b].double()
        means.append(xb + (vb + std_t**2 / (2 * t) * (xb + (1 - t) * vb)) * dt)
        stds.append(std_t * math.sqrt(-dt))
    return torch.stack(means), torch.tensor(stds, dtype=torch.float64)


@pytest.mark.parametrize("eta", [0.3, 0.7, 1.0])
def test_sde_transition_matches_formula_including_sigma_one(eta):
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    sigma = torch.tensor([1.0, 0.9, 0.5, 0.1])  # first sample at sigma = 1: the capped case
    sigma_next = torch.tensor([0.95, 0.8, 0.3, 0.0])
    sigma_cap = torch.full((4,), 0.95)
    mean, std = sde_transition(x, v, sigma, sigma_next, eta, sigma_cap)
    ref_mean, ref_std = _reference_transition(x, v, sigma, sigma_next, eta, sigma_cap)
    assert mean.dtype == std.dtype == torch.float32 and std.shape == (4,)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std.double(), ref_std, rtol=1e-5, atol=1e-7)
    assert torch.isfinite(mean).all() and torch.isfinite(std).all()


def test_sde_transition_eta_zero_is_euler():
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    sigma, sigma_next = torch.tensor([1.0, 0.6, 0.2]), torch.tensor([0.9, 0.4, 0.0])
    mean, std = sde_transition(x, v, sigma, sigma_next, 0.0, torch.full((3,), 0.9))
    torch.testing.assert_close(mean, x + v * (sigma_next - sigma)[:, None], rtol=0, atol=1e-7)
    assert torch.equal(std, torch.zeros(3))


# ------------------------------------------------------- marginals of a known distribution
# Data x0 ~ N(MU, S^2) per channel, x_t = (1 - t) x0 + t eps. (x_t, eps - x0) is jointly Gaussian:
#   E[x_t] = (1 - t) MU,  Var[x_t] = (1 - t)^2 S^2 + t^2,  Cov[eps - x0, x_t] = t - (1 - t) S^2,
# so the exact velocity is v(x, t) = E[eps - x0 | x_t = x] = -MU + Cov / Var * (x - (1 - t) MU).
# Every element evolves independently, so B samples of [2, N] elements are 2 x B*N i.i.d. draws.
MU = torch.tensor([1.5, -0.5]).reshape(1, 2, 1)
S = torch.tensor([0.5, 2.0]).reshape(1, 2, 1)


def exact_velocity(x, sigma, cond):
    t = sigma.reshape(-1, 1, 1)
    var = (1 - t) ** 2 * S**2 + t**2
    cov = t - (1 - t) * S**2
    return -MU + cov / var * (x - (1 - t) * MU)


def _gaussian_rollout(noise_level, num_steps, batch=4, elements=5000):
    gens = [generator(7, i) for i in range(batch)]
    x_T = torch.stack([torch.randn(2, elements, generator=gen) for gen in gens])
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1)
    traj = FlowSDESampler(noise_level=noise_level).rollout(
        exact_velocity, x_T, sigmas, None, gens, torch.zeros(batch, dtype=torch.long), torch.arange(batch)
    )
    return traj, x_T


def _marginal_errors(samples, t):
    """(|mean error| / expected std, |std / expected std - 1|), worst channel, at noise level t."""
    draws = samples.transpose(0, 1).reshape(2, -1).double()
    mean = ((1 - t) * MU).flatten().double()
    std = ((1 - t) ** 2 * S**2 + t**2).sqrt().flatten().double()
    return float(((draws.mean(1) - mean).abs() / std).max()), float((draws.std(1) / std - 1).abs().max())


# 20000 draws per channel: the sampling error of the mean is ~0.007 std and of the std ~0.5%; 30
# Euler-Maruyama steps add up to ~2% on the std. A drift without (or with half) the correction
# inflates the std by 25-90%.
MEAN_TOL, STD_TOL = 0.03, 0.05


def test_sde_preserves_the_marginals_of_a_gaussian():
    traj, _ = _gaussian_rollout(noise_level=0.7, num_steps=30)
    assert bool(traj.stochastic.all())
    for j in (10, 20, 30):  # the marginal at every noise level, not only at the end
        mean_err, std_err = _marginal_errors(traj.latents[:, j], float(traj.sigmas[0, j]))
        assert mean_err < MEAN_TOL and std_err < STD_TOL, (j, mean_err, std_err)


@pytest.mark.parametrize("wrong", ["no_correction", "half_correction"])
def test_sde_marginal_check_catches_a_wrong_drift(monkeypatch, wrong):
    """The same check fails when the sampler's drift correction is dropped or mis-scaled."""
    right = flow_sde.sde_transition
    factor = {"no_correction": 0.0, "half_correction": 0.5}[wrong]

    def wrong_transition(x, v, sigma, sigma_next, eta, sigma_cap):
        euler, _ = right(x, v, sigma, sigma_next, 0.0, sigma_cap)
        mean, std = right(x, v, sigma, sigma_next, eta, sigma_cap)
        return euler + factor * (mean - euler), std

    monkeypatch.setattr(flow_sde, "sde_transition", wrong_transition)
    traj, _ = _gaussian_rollout(noise_level=0.7, num_steps=30)
    _, std_err = _marginal_errors(traj.final, 0.0)
    assert std_err > 4 * STD_TOL, std_err


def test_ode_transports_noise_to_data():
    """Noise level 0: the Euler ODE with the exact velocity maps eps to MU + S * eps, sample by sample."""
    traj, x_T = _gaussian_rollout(noise_level=0.0, num_steps=500, batch=2, elements=2000)
    assert not bool(traj.stochastic.any()) and bool((traj.log_probs == 0).all())
    # Euler's error is O(1/steps): at most 0.023 (on |x| up to ~9) at 500 steps.
    torch.testing.assert_close(traj.final, MU + S * x_T, rtol=0, atol=0.03)
    # 4000 draws per channel: sampling error ~0.016 std on the mean, ~1.1% on the std.
    mean_err, std_err = _marginal_errors(traj.final, 0.0)
    assert mean_err < 0.05 and std_err < 0.035


# ------------------------------------------------------------------------------ stochastic steps


@pytest.mark.parametrize(
    "start, size, expected",
    [
        (0, None, [1, 1, 1, 1, 1, 1]),
        (2, None, [0, 0, 1, 1, 1, 1]),
        (1, 2, [0, 1, 1, 0, 0, 0]),
        (0, 1, [1, 0, 0, 0, 0, 0]),
        (4, 5, [0, 0, 0, 0, 1, 1]),  # a window past the end is cut at the last step
    ],
)
def test_stochastic_steps_window(start, size, expected):
    mask = FlowSDESampler(noise_level=0.7, window_start=start, window_size=size).plan(torch.linspace(1, 0, 7)).stochastic
    assert mask.dtype == torch.bool
    assert mask.tolist() == [bool(e) for e in expected]


def test_no_stochastic_steps_at_noise_zero():
    assert not FlowSDESampler(noise_level=0.0, window_start=0, window_size=3).plan(torch.linspace(1, 0, 7)).stochastic.any()


# -------------------------------------------------------------- a real policy: replay and chunks

PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow square"]


@pytest.fixture(scope="module")
def toy_policy(tiny_toy_dir):
    policy = SD3Policy(
        str(tiny_toy_dir), finetune="lora", lora_rank=4, lora_alpha=4.0, dtype="float32", max_sequence_length=0,
        height=16, width=16,
    )
    # Non-zero LoRA B (gaussian init leaves it 0), so the adapters are really in the computation.
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in policy.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return policy


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_recomputed_log_probs_equal_rollout_bitwise(toy_policy, reduction):
    sampler = FlowSDESampler(noise_level=0.7, window_start=1, window_size=2, log_prob_reduction=reduction)
    prompt_ids, sample_ids = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 0, 0])
    chunks, _ = rollout_chunks(
        toy_policy, sampler, PROMPTS, prompt_ids, sample_ids, seed_parts=(11, 0), num_steps=5, guidance_scale=4.5,
        micro_batch=2, height=16, width=16,
    )
    assert [bool(s) for s in chunks[0].stochastic[0]] == [False, True, True, False, False]

    def predict(x, sigma, cond):
        return toy_policy.predict(x, sigma, cond, 4.5)

    for traj in chunks:  # training replays the rollout's chunks, with gradients on
        cond = toy_policy.encode([PROMPTS[int(p)] for p in traj.prompt_ids])
        assert bool((traj.log_probs[:, [0, 3, 4]] == 0).all())
        for j in (1, 2):
            log_prob, mean, std = sampler.log_prob(predict, traj, j, cond)
            assert log_prob.requires_grad  # it is what the loss differentiates
            assert torch.equal(log_prob.detach(), traj.log_probs[:, j]), (j, (log_prob - traj.log_probs[:, j]).abs().max())
            assert bool((std > 0).all())
        for j in (0, 3, 4):
            with pytest.raises(ValueError, match=f"step {j} was deterministic"):
                sampler.log_prob(predict, traj, j, cond)


def _rollout_by_sample(policy, micro_batch, order):
    """Roll out the 8 samples below in ``order``, ``micro_batch`` at a time; rows returned in canonical order."""
    sampler = FlowSDESampler(noise_level=0.7, window_start=0, window_size=3)
    prompt_ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    sample_ids = torch.tensor([0, 1, 2, 0, 1, 0, 1, 2])
    chunks, images = rollout_chunks(
        policy, sampler, PROMPTS, prompt_ids[order], sample_ids[order], seed_parts=(5, 1), num_steps=4,
        guidance_scale=4.5, micro_batch=micro_batch, height=16, width=16,
    )
    back = torch.argsort(order)  # undo the permutation so rows line up by (prompt, sample)
    return Trajectory.cat(chunks)[back], images[back]


_FIELDS = ("latents", "log_probs", "pred_x0", "prompt_ids", "sample_ids")


@pytest.mark.parametrize("micro_batch", [2, 4])
def test_samples_do_not_depend_on_chunk_composition(toy_policy, micro_batch):
    """Sample (prompt, index) is bitwise the same whichever samples share its chunk, at any position.

    This is what makes 1 and N ranks agree: every rank rolls out ``micro_batch`` samples at a time,
    but which samples land together (and where) differs with the world size.
    """
    one_rank, one_rank_images = _rollout_by_sample(toy_policy, micro_batch, torch.arange(8))
    assert not torch.equal(one_rank.latents[0], one_rank.latents[1])  # distinct pairs, distinct samples
    # Two ranks taking alternate samples, and an arbitrary shuffle.
    for order in (torch.tensor([0, 2, 4, 6, 1, 3, 5, 7]), torch.tensor([5, 0, 3, 7, 1, 6, 2, 4])):
        split, split_images = _rollout_by_sample(toy_policy, micro_batch, order)
        for field in _FIELDS:
            a, b = getattr(one_rank, field), getattr(split, field)
            assert torch.equal(a, b), (field, (a.float() - b.float()).abs().max())
        assert torch.equal(one_rank_images, split_images)


def test_samples_agree_across_micro_batch_sizes(toy_policy):
    """One batch of 8 vs chunks of 2 and 4: the same samples up to float rounding.

    Not bitwise: on CPU the GEMM kernel (and so the summation order) depends on the number of rows,
    e.g. a Linear on 16 rows (8 samples with CFG) rounds differently from one on 4. Same-size
    chunks are bitwise equal (test above), and every rank uses the same micro_batch.
    """
    whole, whole_images = _rollout_by_sample(toy_policy, 8, torch.arange(8))
    for micro_batch in (2, 4):
        part, part_images = _rollout_by_sample(toy_policy, micro_batch, torch.tensor([5, 0, 3, 7, 1, 6, 2, 4]))
        for field in ("prompt_ids", "sample_ids"):
            assert torch.equal(getattr(whole, field), getattr(part, field))
        # Measured: ~2e-6 on latents of magnitude ~3.
        torch.testing.assert_close(part.latents, whole.latents, rtol=0, atol=2e-5)
        torch.testing.assert_close(part.pred_x0, whole.pred_x0, rtol=0, atol=2e-5)
        torch.testing.assert_close(part.log_probs, whole.log_probs, rtol=0, atol=2e-5)
        torch.testing.assert_close(part_images, whole_images, rtol=0, atol=2e-5)
