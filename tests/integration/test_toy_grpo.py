"""Whole GRPO jobs on the shipped toy through the real CLI."""
from __future__ import annotations

import json
import os
import sys

import pytest
from safetensors.torch import load_file

from jobs import ROOT, run, step_rows, train

GOLDEN = ROOT / "tests" / "integration" / "golden" / "toy_grpo_first_steps.json"
GOLDEN_KEYS = ("reward/total", "train/loss", "train/pg_loss", "train/kl", "train/clip_frac")


def test_short_run_outputs_and_golden_numbers(tmp_path):
    """Three steps: every promised output exists, the ratio is exactly 1 on-policy, and the first
    steps reproduce the golden numbers (regenerate: STEERFLOW_REGEN_GOLDEN=1, and say why in the commit)."""
    rows = train(tmp_path, "train.steps=3", "train.grid_every=1")
    steps = step_rows(rows)
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["train/onpolicy_log_ratio_max"] == 0.0, "recomputed log-prob differs from the rollout's"
        assert r["train/skipped_updates"] == 0, "a finite update was counted as skipped"
        assert {"reward/jpeg", "reward/shapes", "reward/shapes/count", "time/rollout", "throughput/images_per_s"} <= set(r)
    # LoRA starts with B = 0, so until the first optimizer step the policy IS the reference.
    assert steps[0]["train/kl"] == 0.0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) >= {"eval_before", "eval_after", "checkpoint", "wall_time_s"}
    assert "eval/geneval" in summary["eval_before"]
    ckpt = tmp_path / "checkpoints" / "step_000003"
    assert (ckpt / "policy.safetensors").is_file() and (ckpt / "config.yaml").is_file()
    assert all("lora" in k for k in load_file(str(ckpt / "policy.safetensors")))
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == [
        "eval_000000.png", "eval_000003.png", "train_000001.png", "train_000002.png", "train_000003.png"]
    assert (tmp_path / "config.yaml").read_text().count("_target_: models.sd3.SD3Policy") == 1

    got = {f"{r['step']}/{k}": r[k] for r in steps[:2] for k in GOLDEN_KEYS}
    if os.environ.get("STEERFLOW_REGEN_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=2) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-7), k


def test_grpo_raises_the_reward_it_is_trained_on(tmp_path):
    """A few steps of the default job (JPEG compressibility, fixed seeds) raise the held-out score of that reward.

    A sign error in the advantages, a detached log-prob or a broken optimizer step makes it fall or stay put.
    """
    # Every stochastic step trained (timestep_fraction 1): the least noisy gradient for a short run.
    train(tmp_path, "train.steps=8", "algorithm.kl_beta=0", "algorithm.timestep_fraction=1.0")
    summary = json.loads((tmp_path / "summary.json").read_text())
    before, after = summary["eval_before"]["eval/jpeg"], summary["eval_after"]["eval/jpeg"]
    # Measured: -1.205 -> -1.166 (deterministic on CPU); a sign error gives a fall.
    assert after > before + 0.01, (before, after)  # reward = -kB of the JPEG: higher is smaller files


def test_sample_from_checkpoint(tmp_path):
    train(tmp_path / "run", "train.steps=1")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    run([sys.executable, "-m", "launch.sample", f"checkpoint={tmp_path / 'run/checkpoints/step_000001'}",
         f"prompts={prompts}", f"out={tmp_path / 'out'}", "num_per_prompt=2"])
    index = [json.loads(line) for line in (tmp_path / "out" / "index.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["sample"]) for r in index] == [
        ("a red circle", 0), ("a red circle", 1), ("two blue squares", 0), ("two blue squares", 1)]
    assert all((tmp_path / "out" / r["file"]).is_file() for r in index)
    assert len({r["seed"] for r in index}) == 4


def test_zero3_checkpoint_holds_the_full_trainable_weights(tmp_path):
    """ZeRO-3 shards parameters across ranks; the saved policy must hold whole tensors, loadable by launch.sample."""
    train(tmp_path, "train.steps=1", "deepspeed=zero3")
    state = load_file(str(tmp_path / "checkpoints" / "step_000001" / "policy.safetensors"))
    assert state and min(v.numel() for v in state.values()) > 0


def test_rewards_overlapped_with_sampling_give_the_same_run(tmp_path):
    """Chunks scored in the background while the next one samples (the default) change nothing."""
    on = step_rows(train(tmp_path / "on", "train.steps=1"))
    off = step_rows(train(tmp_path / "off", "train.steps=1", "train.overlap_rewards=false"))
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))}  # noqa: E731
    assert [strip(r) for r in on] == [strip(r) for r in off]


@pytest.mark.slow  # four launches (~40 s); the EMA arithmetic and swap are unit-tested: make test-all
def test_policy_ema_is_checkpointed_resumed_and_exported(tmp_path):
    """train.ema_decay: every checkpoint's ema.safetensors follows ema_t = d ema_{t-1} + (1 - d) w_t against the
    saved weights; a resumed run continues it bit for bit; launch.export ema=true exports it."""
    import torch

    from launch.export import ExportConfig, export

    ema_run = ["train.ema_decay=0.5", "train.save_every=1", "train.keep_last=0", "data.eval_size=8"]
    train(tmp_path / "a", "train.steps=2", *ema_run)
    ck = {s: tmp_path / "a" / "checkpoints" / f"step_{s:06d}" for s in (1, 2)}
    ema = {s: load_file(str(ck[s] / "ema.safetensors")) for s in ck}
    w2 = load_file(str(ck[2] / "policy.safetensors"))
    assert ema[2].keys() == w2.keys()
    for k in w2:
        torch.testing.assert_close(ema[2][k], 0.5 * ema[1][k] + 0.5 * w2[k].float(), rtol=0, atol=1e-7)
    assert any(not torch.equal(ema[2][k], w2[k].float()) for k in w2)  # it is not just the weights
    # Resumed at step 1: the EMA comes back from the checkpoint, so step 2's is the straight run's, bit for bit.
    train(tmp_path / "b", "train.steps=1", *ema_run)
    train(tmp_path / "b", "train.steps=2", *ema_run)
    resumed = load_file(str(tmp_path / "b" / "checkpoints" / "step_000002" / "ema.safetensors"))
    assert all(torch.equal(resumed[k], ema[2][k]) for k in ema[2])
    # Exported with ema=true: every exported tensor is one of the EMA's (the LoRA under diffusers' names).
    out = export(ExportConfig(checkpoint=str(ck[2]), out=str(tmp_path / "lora_ema"), ema=True))
    exported = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert len(exported) == len(ema[2])
    for v in exported.values():
        assert any(v.shape == e.shape and torch.equal(v.float(), e) for e in ema[2].values())
    assert "exported: these are the EMA" in (out / "README.md").read_text()
