"""Whole jobs of the forward-process algorithms (algorithm=nft, algorithm=dpo) on the shipped shapes toy
through the real CLI: each raises the reward it is trained on from a fixed seed, and DiffusionNFT (whose
old policy is algorithm state) resumes exactly."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

# jobs.train runs the SMALL shapes-toy job (JPEG compressibility trained, 4 prompts x 4 samples) with overrides.
from jobs import step_rows, train


def _jpeg_before_after(run_dir: Path) -> tuple[float, float]:
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary["eval_before"]["eval/jpeg"], summary["eval_after"]["eval/jpeg"]


NFT_STEPS = ["algorithm=nft", "train.steps=4"]


@pytest.fixture(scope="module")
def nft_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    """Four uninterrupted DiffusionNFT steps (shared by the reward and the resume tests)."""
    d = tmp_path_factory.mktemp("nft")
    return d, train(d, *NFT_STEPS)


def test_nft_raises_the_reward_it_is_trained_on(nft_run):
    """Four DiffusionNFT steps raise the held-out JPEG reward; a flipped optimality probability (pulling
    towards the worse samples) or a detached branch makes it fall or stay put."""
    run_dir, rows = nft_run
    before, after = _jpeg_before_after(run_dir)
    # Measured: -1.205 -> -1.108 (GRPO's test needs 8 steps for -1.166).
    assert after > before + 0.05, (before, after)
    steps = step_rows(rows)
    # The first iteration samples with the initial weights and the old policy starts equal to them.
    assert steps[0]["train/old_gap"] == 0.0 and steps[0]["train/old_policy_decay"] == 0.0
    assert [r["train/old_policy_decay"] for r in steps] == pytest.approx([0.0, 0.001, 0.002, 0.003])


def test_dpo_raises_the_reward_it_is_trained_on(tmp_path):
    """Eight online DPO steps on every in-group pair raise the held-out JPEG reward; the first loss is
    exactly log 2 (LoRA starts as the identity, so the policy IS the reference), which a reference
    forward that silently used the policy would keep forever."""
    rows = train(tmp_path, "algorithm=dpo", "algorithm.pairs=all", "algorithm.beta=50", "train.steps=8")
    before, after = _jpeg_before_after(tmp_path)
    # Measured: -1.205 -> -1.164.
    assert after > before + 0.02, (before, after)
    steps = step_rows(rows)
    assert steps[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6) and steps[0]["train/margin"] == 0.0
    assert steps[-1]["train/margin"] > 0 and steps[-1]["train/loss"] < math.log(2)


def _comparable(rows: list[dict]) -> list[dict]:
    """Training rows and the last evaluation, without wall-clock timings."""
    keep = step_rows(rows) + [r for r in rows if "eval/num_prompts" in r][-1:]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in keep]


def test_nft_two_steps_then_resumed_to_four_equals_four_straight(nft_run, tmp_path):
    """The old policy (an EMA that also samples) is checkpointed: 2 steps, then the same command with
    train.steps=4, logs exactly what 4 uninterrupted steps log (a lost or re-initialised EMA changes the
    rollouts of steps 3 and 4)."""
    train(tmp_path, "algorithm=nft", "train.steps=2")
    resumed = train(tmp_path, *NFT_STEPS)
    assert [r["step"] for r in step_rows(resumed)] == [1, 2, 3, 4]
    assert _comparable(resumed) == _comparable(nft_run[1])
