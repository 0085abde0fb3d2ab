"""Each model family trains through the real CLI from a local diffusers folder: a tiny random FLUX.1-dev
and Qwen-Image saved with save_pretrained, one GRPO step with DDPO's JPEG-compressibility reward on a
prompts file (the user's command for a real checkpoint, with small sizes)."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from jobs import run
from tiny_families import TINY_FAMILY_SIZE, build_tiny_flux, build_tiny_qwen_image, save_tiny

FAMILIES = {
    # model config, tiny builder, the family's own knobs at toy size
    "flux_1_dev": (build_tiny_flux, ["model.max_sequence_length=16", "sampler.guidance_scale=3.5"]),
    "qwen_image": (build_tiny_qwen_image, ["model.max_sequence_length=64", "sampler.guidance_scale=4.0"]),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_one_step_through_the_cli(tmp_path, family):
    builder, knobs = FAMILIES[family]
    folder = save_tiny(builder(), tmp_path / "model")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\ntwo green triangles\na yellow star\n")
    run_dir = tmp_path / "run"
    run([
        sys.executable, "-m", "launch.train", "experiment=sd35_medium_jpeg", f"model={family}", f"model.path={folder}",
        f"model.height={TINY_FAMILY_SIZE}", f"model.width={TINY_FAMILY_SIZE}", "model.lora_rank=4", "model.lora_alpha=8",
        f"data.prompts={prompts}", f"data.eval_prompts={prompts}", "data.prompts_per_step=2", "data.eval_size=2",
        "algorithm.group_size=2", "train.micro_batch=2", "train.eval_batch=2", "train.steps=1", "sampler.num_steps=3",
        "sampler.eval_num_steps=3", "logger=none", "train.progress=false", "train.num_threads=1", f"run_dir={run_dir}",
        *knobs,
    ], timeout=300)
    config = (run_dir / "config.yaml").read_text()
    assert f"path: {folder}" in config and f"models.{'flux.FluxPolicy' if 'flux' in family else 'qwen_image.QwenImagePolicy'}" in config
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if "train/loss" in r)
    assert step["train/onpolicy_log_ratio_max"] == 0.0  # the recomputed log-probs equal the rollout's
    assert step["train/skipped_updates"] == 0 and step["train/grad_norm"] > 0
    assert -5 < step["reward/jpeg"] < 0  # minus the kB of a 16 px JPEG
    # The checkpoint holds the trained LoRA, moved off its zero init by the step.
    weights = load_file(run_dir / "checkpoints" / "step_000001" / "policy.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all("lora_" in k for k in weights)
    assert max(float(v.abs().max()) for v in lora_b) > 0
    assert all(torch.isfinite(v).all() for v in weights.values())
