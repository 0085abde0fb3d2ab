"""Rewards in worker processes (executor=process): same scores as in a thread, and every failure mode
(an exception, a dead worker, a stalled worker) is a prompt error naming the reward, never a hang."""
from __future__ import annotations

import time

import pytest
import torch

from rewards.ensemble import RewardEnsemble

IMAGES = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a red circle"]
SHAPES = {"_target_": "rewards.shapes.ShapesReward"}


def test_process_executor_scores_exactly_like_a_thread():
    specs = {"jpeg": {"_target_": "rewards.jpeg.JpegCompressibility"}, "shapes": SHAPES}
    in_thread = RewardEnsemble(specs)(IMAGES, PROMPTS)
    ens = RewardEnsemble({n: {**s, "executor": "process"} for n, s in specs.items()})
    try:
        assert not ens.rewards["jpeg"].differentiable
        got = ens(IMAGES, PROMPTS)
        background = ens.submit(IMAGES, PROMPTS).result()
    finally:
        ens.close()
    for result in (got, background):
        assert torch.equal(result.total, in_thread.total)
        assert result.components.keys() == in_thread.components.keys()
        for k in in_thread.components:
            assert torch.equal(result.components[k].nan_to_num(-1), in_thread.components[k].nan_to_num(-1)), k


@pytest.mark.parametrize("target, needle", [
    ("misbehaving_rewards.Raises", "the scorer rejected this batch"),
    ("misbehaving_rewards.Dies", "worker process died (exit code 3)"),
])
def test_a_failing_worker_is_an_error_naming_the_reward(target, needle):
    ens = RewardEnsemble({"judge": {"_target_": target, "executor": "process", "timeout_s": 60}})
    try:
        with pytest.raises(RuntimeError, match="reward 'judge'") as info:
            ens(IMAGES, PROMPTS)
        assert needle in str(info.value)
    finally:
        ens.close()


def test_a_stalled_worker_times_out_and_is_killed():
    ens = RewardEnsemble({"slow": {"_target_": "misbehaving_rewards.Stalls", "executor": "process", "timeout_s": 1.0}})
    try:
        t = time.monotonic()
        with pytest.raises(RuntimeError, match=r"within 1.0 s \(rewards.slow.timeout_s=1.0\) during __call__; the worker was killed"):
            ens(IMAGES, PROMPTS)
        assert time.monotonic() - t < 10
        assert not ens.rewards["slow"]._proc.is_alive() or ens.rewards["slow"]._proc.join(5) is None
    finally:
        ens.close()


def test_state_crosses_the_process_boundary():
    ens = RewardEnsemble({"n": {"_target_": "misbehaving_rewards.Counts", "executor": "process"}})
    try:
        ens(IMAGES, PROMPTS)
        ens(IMAGES, PROMPTS)
        assert ens.state_dict() == {"n": {"calls": 2}}
        ens.load_state_dict({"n": {"calls": 7}})
        assert ens.state_dict() == {"n": {"calls": 7}}
    finally:
        ens.close()


def test_executor_knobs_are_checked():
    with pytest.raises(ValueError, match=r"rewards.j.executor='procs'"):
        RewardEnsemble({"j": {"_target_": "rewards.jpeg.JpegCompressibility", "executor": "procs"}})
    with pytest.raises(ValueError, match=r"rewards.j.timeout_s is read only with executor=process"):
        RewardEnsemble({"j": {"_target_": "rewards.jpeg.JpegCompressibility", "timeout_s": 5}})


def test_a_workers_prompt_check_is_refused_like_in_a_thread():
    """OCR in a worker still refuses prompts that quote no text at start-up, with the same message."""
    ens = RewardEnsemble({"ocr": {"_target_": "rewards.ocr.OcrReward", "executor": "process"},
                          "jpeg": {"_target_": "rewards.jpeg.JpegCompressibility", "executor": "process"}})
    try:
        assert not hasattr(ens.rewards["jpeg"], "check_prompts")
        ens.check_prompts(['a sign that says "cat"'], "data.prompts")
        with pytest.raises(ValueError, match=r"reward 'ocr' \(rewards.ocr\) cannot score data.prompts: 1 of 2 prompts "
                                             r"quote no text.*experiment=toy_text"):
            ens.check_prompts(['a sign that says "cat"', "the digit three"], "data.prompts")
        ens.check_prompts(['a sign that says "dog"'], "data.prompts")  # the worker still answers
    finally:
        ens.close()
