"""Windows and noise schedules: exactly the requested stochastic steps and noise levels, a pure function of
(seed, iteration), the knob rules, and the calibration state that a resume must restore."""
from __future__ import annotations

import json

import pytest
import torch

from samplers.cps import CPSSampler
from samplers.ddim import DDIMSampler
from samplers.flow_sde import FlowSDESampler
from samplers.schedule import window_mask
from trainer.rng import STREAM_ROLLOUT, generator

FLOW_10 = torch.linspace(1.0, 0.0, 11)  # a 10-step flow chain ending at 0


def steps_of(plan):
    return plan.stochastic.nonzero().flatten().tolist()


# ---------------------------------------------------------------------------------------- windows
@pytest.mark.parametrize("cls, last", [(FlowSDESampler, 10), (CPSSampler, 9)])
def test_fixed_windows(cls, last):
    """[start, start + size), cut at the last step that can carry noise (CPS: not the one into sigma 0)."""
    assert steps_of(cls(noise_level=0.5).plan(FLOW_10)) == list(range(last))
    assert steps_of(cls(noise_level=0.5, window_start=3).plan(FLOW_10)) == list(range(3, last))
    assert steps_of(cls(noise_level=0.5, window_start=2, window_size=3).plan(FLOW_10)) == [2, 3, 4]
    assert steps_of(cls(noise_level=0.5, window_start=8, window_size=5).plan(FLOW_10)) == list(range(8, last))


def test_fixed_window_with_no_step_that_can_carry_noise_is_an_error():
    with pytest.raises(ValueError, match="selects no step that can carry noise"):
        CPSSampler(noise_level=0.5, window_start=9).plan(FLOW_10)


def test_sliding_window_moves_with_the_iteration_and_stops_at_the_end():
    s = FlowSDESampler(noise_level=0.7, window="sliding", window_start=1, window_size=3, window_stride=2, window_every=4)
    starts = [steps_of(s.plan(FLOW_10, it))[0] for it in range(0, 24, 2)]
    # moves 2 steps every 4 iterations from step 1, until the window's end reaches the last step (start 7)
    assert starts == [1, 1, 3, 3, 5, 5, 7, 7, 7, 7, 7, 7]
    assert all(len(steps_of(s.plan(FLOW_10, it))) == 3 for it in range(40))


def test_random_window_is_a_pure_function_of_seed_and_iteration():
    s = FlowSDESampler(noise_level=0.7, window="random", window_start=1, window_size=2, window_start_max=6)

    def start(seed, it):
        plan = s.plan(FLOW_10, it, generator(seed, STREAM_ROLLOUT, it))
        assert len(steps_of(plan)) == 2 and steps_of(plan)[1] == steps_of(plan)[0] + 1
        return steps_of(plan)[0]

    first = [start(0, it) for it in range(60)]
    assert first == [start(0, it) for it in range(60)]  # same (seed, iteration): same window, no hidden state
    assert [start(0, it) for it in range(59, -1, -1)] == first[::-1]  # order of calls does not matter
    assert first != [start(1, it) for it in range(60)]  # another seed: another sequence
    assert set(first) == set(range(1, 7))  # uniform over [window_start, window_start_max]: all of them appear
    with pytest.raises(ValueError, match="needs the iteration's generator"):
        s.plan(FLOW_10, 0)


def test_moving_windows_must_fit_the_steps_that_can_carry_noise():
    with pytest.raises(ValueError, match="does not fit"):
        CPSSampler(noise_level=0.5, window="random", window_start=5, window_size=5).plan(FLOW_10, 0, torch.Generator())
    # The same window fits the flow SDE, whose last step can carry noise.
    assert steps_of(FlowSDESampler(noise_level=0.5, window="random", window_start=5, window_size=5)
                    .plan(FLOW_10, 0, torch.Generator())) == [5, 6, 7, 8, 9]


def test_window_mask_rejects_a_gap_in_the_steps_that_can_carry_noise():
    with pytest.raises(ValueError, match="not contiguous"):
        window_mask(torch.tensor([True, False, True]), "fixed", 0, None, 1, None, None, 0, None)


def test_ddim_last_step_into_alpha_one_is_deterministic_and_flow_schedules_are_refused():
    vp = torch.tensor([0.99, 0.8, 0.5, 0.2, 0.0])
    assert steps_of(DDIMSampler(noise_level=1.0).plan(vp)) == [0, 1, 2]
    with pytest.raises(ValueError, match="sampler=ddim needs the VP noise scales"):
        DDIMSampler(noise_level=1.0).plan(FLOW_10)
    with pytest.raises(ValueError, match="sampler=ddim needs the VP noise scales"):
        DDIMSampler(noise_level=0.0).plan(FLOW_10)  # also at noise 0 (evaluation)


# ----------------------------------------------------------------------------------- noise levels
def test_noise_levels_per_schedule():
    const = FlowSDESampler(noise_level=0.7, window_start=2, window_size=3).plan(FLOW_10)
    assert const.noise_levels.tolist() == pytest.approx([0, 0, 0.7, 0.7, 0.7, 0, 0, 0, 0, 0])
    decay = FlowSDESampler(noise_level=0.8, noise_schedule="decay", noise_decay=0.5).plan(FLOW_10)
    assert decay.noise_levels.tolist() == pytest.approx([0.8 * 0.5**j for j in range(10)])
    table = [1.0, 2.0, 0.5, 1.5, 1.0, 1.0, 1.0, 1.0, 0.25, 3.0]
    tab = FlowSDESampler(noise_level=0.4, noise_schedule="table", noise_table=table, window_start=1).plan(FLOW_10)
    assert tab.noise_levels.tolist() == pytest.approx([0.0] + [0.4 * m for m in table[1:]])
    with pytest.raises(ValueError, match="noise_table has 10 entries but the chain has 5 steps"):
        FlowSDESampler(noise_level=0.4, noise_schedule="table", noise_table=table).plan(torch.linspace(1, 0, 6))
    assert const.noise_levels.dtype == torch.float32


def test_noise_level_beyond_the_kernel_range_is_refused():
    with pytest.raises(ValueError, match="must be <= 1.0 for CPSSampler"):
        CPSSampler(noise_level=1.5)
    with pytest.raises(ValueError, match="exceeds 1.0"):
        CPSSampler(noise_level=0.9, noise_schedule="table", noise_table=[1.0] * 9 + [2.0]).plan(torch.linspace(1, 0.1, 11))


# ------------------------------------------------------------------------------------- knob rules
@pytest.mark.parametrize("knobs, needle", [
    (dict(noise_decay=0.5), "sampler.noise_decay (0.5) is only read when sampler.noise_schedule=decay"),
    (dict(noise_table=[1.0] * 10), "sampler.noise_table ([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]) is only read"),
    (dict(noise_schedule="decay"), "sampler.noise_decay (None) must be in (0, 1]"),
    (dict(noise_schedule="table", noise_table=[1.0, 0.0]), "must list a multiplier > 0 per step"),
    (dict(window_every=3), "sampler.window_every (3) is only read when sampler.window=sliding"),
    (dict(window_stride=2), "sampler.window_stride (2) is only read when sampler.window=sliding"),
    (dict(window_start_max=4), "sampler.window_start_max (4) is only read when sampler.window=random"),
    (dict(window="sliding", window_size=2), "sampler.window_every (None) must be >= 1"),
    (dict(window="random"), "sampler.window_size must be set with sampler.window=random"),
    (dict(window="spiral"), "sampler.window ('spiral') must be one of"),
    (dict(calibration_bounds=[0.5, 2.0]), "only read when sampler.calibration_rate is set"),
    (dict(calibration_rate=0.5, calibration_bounds=[2.0, 4.0]), "must be [low, high] with 0 < low <= 1 <= high"),
    (dict(reward_guidance_scale=1.0), "needs sampler.reward_guidance"),
    (dict(ode_solver="rk4"), "sampler.ode_solver ('rk4') must be one of"),
    (dict(start_step=3, window_start=1), "sampler.window_start (1) must be >= sampler.start_step (3)"),
])
def test_an_ignored_or_inconsistent_knob_is_an_error(knobs, needle):
    with pytest.raises(ValueError) as info:
        FlowSDESampler(noise_level=0.7, **knobs)
    assert needle in str(info.value)


# -------------------------------------------------------------------------------------- calibration
def test_calibration_update_rule_bounds_and_exact_state_round_trip():
    s = FlowSDESampler(noise_level=0.5, calibration_rate=1.0, calibration_bounds=[0.5, 2.0], num_steps=10)
    assert s.needs_step_rewards and not FlowSDESampler().needs_step_rewards
    nan = float("nan")
    s.calibrate(torch.tensor([1.0, 0.0, 0.5, nan] + [0.75] * 6))
    scale = s.state_dict()["noise_scale"]
    assert scale[:4] == pytest.approx([2.718281828 ** 0.5, 2.718281828 ** -0.5, 1.0, 1.0])
    for _ in range(5):
        s.calibrate(torch.tensor([1.0, 0.0] + [0.5] * 8))
    assert s.state_dict()["noise_scale"][:2] == [2.0, 0.5]  # clipped to the bounds
    # The plan uses the multipliers on top of the schedule.
    assert s.plan(FLOW_10).noise_levels[:2].tolist() == pytest.approx([1.0, 0.25])

    # JSON round trip (trainer_state.json) restores the exact floats; a fresh sampler then plans and
    # calibrates exactly as the original does from here on.
    restored = FlowSDESampler(noise_level=0.5, calibration_rate=1.0, calibration_bounds=[0.5, 2.0], num_steps=10)
    restored.load_state_dict(json.loads(json.dumps(s.state_dict())))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        share = torch.rand(10, generator=g)
        s.calibrate(share)
        restored.calibrate(share)
        assert s.state_dict() == restored.state_dict()
        assert torch.equal(s.plan(FLOW_10).noise_levels, restored.plan(FLOW_10).noise_levels)


def test_calibration_state_mismatches_are_errors():
    with pytest.raises(ValueError, match="calibration is off"):
        FlowSDESampler().load_state_dict({"noise_scale": [1.0] * 10})
    FlowSDESampler().load_state_dict({})  # nothing saved, nothing expected
    with pytest.raises(ValueError, match="has 3 steps, sampler.num_steps is 10"):
        FlowSDESampler(calibration_rate=0.1, num_steps=10).load_state_dict({"noise_scale": [1.0] * 3})
    with pytest.raises(ValueError, match="needs sampler.calibration_rate"):
        FlowSDESampler().calibrate(torch.zeros(10))
