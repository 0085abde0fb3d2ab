"""Samplers other than the default through the real CLI: 2 processes draw the same samples as 1 (a random
window included), and a calibrated noise table comes back exactly after a resume."""
from __future__ import annotations


import pytest

from jobs import Torchrun, step_rows, train

TORCHRUN = Torchrun(2)
FAST = ["data.eval_size=8"]


def _plain(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows]


def test_cps_with_a_random_window_on_two_processes_matches_one(tmp_path):
    """The window is drawn from (seed, iteration) alone, so both ranks and the single process agree on it."""
    overrides = ["train.steps=1", "sampler=cps", "sampler.noise_level=0.5", "sampler.window=random",
                 "sampler.window_size=3", *FAST]
    s1 = step_rows(train(tmp_path / "one", *overrides))[0]
    s2 = step_rows(train(tmp_path / "two", *overrides, launcher=TORCHRUN))[0]
    assert s1["train/onpolicy_log_ratio_max"] == s2["train/onpolicy_log_ratio_max"] == 0.0
    assert s1["sampler/first_stochastic_step"] == s2["sampler/first_stochastic_step"]
    for key in ("reward/total", "reward/shapes/count", "reward/shapes/color"):
        assert s1[key] == s2[key], key  # bitwise: same noise per (step, prompt id, sample index), same window
    for key in ("train/loss", "train/pg_loss", "train/kl", "train/clip_frac"):
        assert s2[key] == pytest.approx(s1[key], rel=1e-6, abs=1e-9), key


@pytest.mark.slow  # three launches (~35 s): make test-all
def test_calibrated_noise_table_is_restored_on_resume(tmp_path):
    """2 steps straight == 1 step, then a relaunch to 2: the step-2 rollout uses the table calibrated in
    step 1 (saved in the checkpoint), so its rewards and losses are bitwise those of the straight run."""
    overrides = ["sampler.calibration_rate=4.0", "sampler.window_size=4", *FAST]
    straight = _plain(step_rows(train(tmp_path / "a", "train.steps=2", *overrides)))
    train(tmp_path / "b", "train.steps=1", *overrides)
    resumed = _plain(step_rows(train(tmp_path / "b", "train.steps=2", *overrides)))
    assert resumed == straight
    scales = [straight[0][f"sampler/noise_scale/{j}"] for j in range(4)]
    assert any(abs(s - 1) > 0.05 for s in scales), scales  # the table really moved (else the test proves nothing)
    assert all(straight[0][f"sampler/noise_scale/{j}"] == 1.0 for j in range(4, 8))  # outside the window: untouched


def test_partial_chains_from_base_samples_on_two_processes_match_one(tmp_path):
    """Partial chains (InstructVideo) start from the base model's cached sample of each (prompt, variant),
    forward-noised to sigma[start_step]: computed in fixed blocks, so 2 ranks asking for different pairs
    get bitwise the latents 1 process gets; only the steps after start_step are sampled and trained."""
    overrides = ["train.steps=1", "sampler.start_step=5", "sampler.window_start=5", "data.clean_source=base", "data.clean_variants=2", *FAST]
    s1 = step_rows(train(tmp_path / "one", *overrides))[0]
    s2 = step_rows(train(tmp_path / "two", *overrides, launcher=TORCHRUN))[0]
    assert s1["sampler/first_stochastic_step"] == 5
    assert s1["train/onpolicy_log_ratio_max"] == s2["train/onpolicy_log_ratio_max"] == 0.0
    for key in ("reward/total", "reward/shapes/count"):
        assert s1[key] == s2[key], key
    assert s2["train/loss"] == pytest.approx(s1["train/loss"], rel=1e-6, abs=1e-9)
    # A partial chain of the last 5 of 10 steps stays close to where it started: the base sample scores
    # like the base model's own samples, not like noise (shapes count reward of noise is ~0).
    assert s1["reward/shapes/count"] > 0.3
