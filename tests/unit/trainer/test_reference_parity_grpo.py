"""Flow-GRPO's KL scale and trained step set, re-derived from its training script in float64.

Ground truth (flow_grpo @ac4c86e, scripts/train_sd3.py and sd3_sde_with_logprob.py, restated here):
  std_dev_t = eta * sqrt(sigma / (1 - sigma))   (sigma = 1 uses sigmas[1] in the denominator)
  kl        = mean over elements |mu - mu_ref|^2 / (2 std_dev_t^2)          (no sqrt(-dt) factor)
  trained   = range(int(num_steps * timestep_fraction)), in chain order.
The update runs through steerflow's real ratio_updates / GRPO.update with a recording context.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from samplers.cps import CPSSampler
from samplers.dance_sde import DanceSDESampler
from samplers.flow_sde import FlowSDESampler
from trainer.algorithms.grpo import GRPO, GRPOConfig, n_train_steps

# SD3's shift-3 schedule over 10 steps, as the scheduler computes it.
T = torch.linspace(1.0, 0.1, 10, dtype=torch.float64)
SIGMAS = torch.cat([3 * T / (1 + 2 * T), torch.zeros(1, dtype=torch.float64)])


def _traj(B=2, L=(1, 2, 2)):
    return SimpleNamespace(sigmas=SIGMAS.float().unsqueeze(0).expand(B, -1))


@pytest.mark.parametrize("j", range(10))
def test_flow_grpo_kl_scale_is_std_dev_t_without_sqrt_dt(j):
    eta = 0.7
    s = FlowSDESampler(noise_level=eta)
    x, v = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    _, std = s.transition(x, v, SIGMAS.float().unsqueeze(0).expand(2, -1), j, eta)
    sigma = float(SIGMAS[j])
    denom = 1 - (float(SIGMAS[1]) if sigma >= 1 else sigma)
    expected = eta * math.sqrt(sigma / denom)  # Flow-GRPO's std_dev_t
    got = s.kl_std(_traj(), j, std, "flow_grpo")
    assert torch.allclose(got.double(), torch.full((2,), expected, dtype=torch.float64), rtol=1e-5)
    assert torch.equal(s.kl_std(_traj(), j, std, "exact"), std)
    ratio = float((std / got)[0]) ** 2  # exact / flow_grpo KL = 1 / |dt|
    assert ratio == pytest.approx(float(SIGMAS[j] - SIGMAS[j + 1]), rel=1e-4)


def test_dance_kl_scale_is_eta_and_cps_has_no_step_factor():
    sig = SIGMAS.float().unsqueeze(0).expand(2, -1)
    x, v = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    d = DanceSDESampler(noise_level=0.3)
    _, std = d.transition(x, v, sig, 3, 0.3)
    assert torch.allclose(d.kl_std(_traj(), 3, std, "flow_grpo"), torch.full((2,), 0.3), rtol=1e-5)
    c = CPSSampler(noise_level=0.5)
    _, std = c.transition(x, v, sig, 3, 0.5)
    assert torch.equal(c.kl_std(_traj(), 3, std, "flow_grpo"), std)


def test_step_counts_follow_int_for_first_and_round_for_random():
    assert n_train_steps(0.99, 10, "first") == 9  # Flow-GRPO: never the last step
    assert n_train_steps(0.6, 16, "first") == 9  # DanceGRPO's int(16 * 0.6)
    assert n_train_steps(0.99, 10, "random") == 10
    assert n_train_steps(0.01, 10, "first") == 1  # at least one


class _RecordingCtx:
    """Just what ratio_updates touches: a sampler whose log-prob is a fixed function of the step, the
    reference's mean, the step order, and a backward that records each micro-step's loss and stats."""

    def __init__(self, sampler, n_steps=10, B=2):
        self.cfg = SimpleNamespace(train=SimpleNamespace(micro_batch=B))
        self.world = SimpleNamespace(rank=0)
        self.sampler = sampler
        self.ref = False
        self.steps, self.kls = [], []
        self.mean = torch.randn(B, 1, 2, 2, generator=torch.Generator().manual_seed(0))
        self.ref_mean = torch.randn(B, 1, 2, 2, generator=torch.Generator().manual_seed(1))
        ctx = self

        class Policy:
            device = torch.device("cpu")

            def reference(self):
                ctx.ref = True

                class C:
                    def __enter__(s):
                        return None

                    def __exit__(s, *a):
                        ctx.ref = False
                return C()

        self.policy = Policy()
        self.traj = SimpleNamespace(
            sigmas=SIGMAS.float().unsqueeze(0).expand(B, -1), stochastic=torch.ones(B, n_steps, dtype=torch.bool),
            log_probs=torch.zeros(B, n_steps), noise_levels=torch.full((B, n_steps), 0.7))

        def log_prob(predict, traj, j, cond):
            x = torch.zeros(B, 1, 2, 2)
            _, std = FlowSDESampler.transition(sampler, x, x, traj.sigmas, j, 0.7)
            mean = self.ref_mean if self.ref else self.mean
            return torch.zeros(B, requires_grad=True), mean, std
        self.sampler_log_prob = log_prob

    def encode(self, traj):
        return None

    def predict(self, *a):
        raise AssertionError("not used")

    def chunk_order(self, n):
        return list(range(n))

    def generator(self, *parts):
        return torch.Generator().manual_seed(sum(parts))

    def backward(self, loss, stats):
        self.kls.append(float(stats["kl"]))


def _run(cfg):
    sampler = FlowSDESampler(noise_level=0.7)
    ctx = _RecordingCtx(sampler)
    sampler_obj = SimpleNamespace(log_prob=ctx.sampler_log_prob, kl_std=sampler.kl_std)
    ctx.sampler = sampler_obj
    recorded = []
    orig = ctx.sampler_log_prob

    def log_prob(predict, traj, j, cond):
        if not ctx.ref:
            recorded.append(j)
        return orig(predict, traj, j, cond)
    sampler_obj.log_prob = log_prob
    batch = SimpleNamespace(chunks=[ctx.traj])
    algo = GRPO(cfg)
    import trainer.algorithms.grpo as g
    saved = g.group_advantages
    g.group_advantages = lambda batch, ctx, s, c: (torch.tensor([1.0, -1.0]), {})
    try:
        algo.update(batch, ctx)
    finally:
        g.group_advantages = saved
    return recorded, ctx


def test_grpo_trains_flow_grpos_steps_with_flow_grpos_kl():
    """Through GRPO.update: steps 0..8 in order, and each micro-step's KL equals Flow-GRPO's formula."""
    cfg = GRPOConfig(kl_beta=0.04, timestep_fraction=0.99, timestep_selection="first", kl_convention="flow_grpo")
    steps, ctx = _run(cfg)
    assert steps == list(range(9))
    assert GRPO(cfg).micro_steps(1, 10) == 9
    d2 = ((ctx.mean.double() - ctx.ref_mean.double()) ** 2).flatten(1).mean(1)
    for j, kl in zip(steps, ctx.kls):
        sigma = float(SIGMAS[j])
        std_dev_t = 0.7 * math.sqrt(sigma / (1 - (float(SIGMAS[1]) if sigma >= 1 else sigma)))
        assert kl == pytest.approx(float((d2 / (2 * std_dev_t**2)).mean()), rel=1e-5), j
    exact_steps, exact_ctx = _run(GRPOConfig(kl_beta=0.04, timestep_fraction=0.99, timestep_selection="random",
                                             kl_convention="exact"))
    assert len(exact_steps) == 10 and sorted(exact_steps) == list(range(10))  # round(9.9) = 10, drawn
    by_step = dict(zip(exact_steps, exact_ctx.kls))
    for j, kl in zip(steps, ctx.kls):  # the true KL divides by std_dev_t^2 |dt| instead
        assert by_step[j] == pytest.approx(kl / float(SIGMAS[j] - SIGMAS[j + 1]), rel=1e-4), j


def test_unknown_conventions_are_config_errors():
    p = GRPO.problems(GRPOConfig(kl_convention="true", timestep_selection="last"), None, 1)
    assert any(m.startswith("algorithm.kl_convention") for m in p)
    assert any(m.startswith("algorithm.timestep_selection") for m in p)
