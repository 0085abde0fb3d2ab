"""SD1.x through the real CLI: a tiny random StableDiffusionPipeline folder saved with save_pretrained, one DDPO
step of experiment=sd15_ddpo_jpeg (DDIM at eta 1, CFG, JPEG compressibility) from a prompts file, then the
exported LoRA loaded back by diffusers. The user's command for a real checkpoint, at toy size."""
from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import load_file

from jobs import run
from tiny_unet_pipelines import SIZE, build_tiny_sd15, save_tiny


def test_sd15_trains_one_ddpo_step_and_exports(tmp_path):
    folder = save_tiny(build_tiny_sd15(), tmp_path / "model")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\ntwo green triangles\na yellow star\n")
    run_dir = tmp_path / "run"
    run([
        sys.executable, "-m", "launch.train", "experiment=sd15_ddpo_jpeg", f"model.path={folder}",
        f"model.height={SIZE}", f"model.width={SIZE}", "model.lora_alpha=8", f"data.prompts={prompts}",
        f"data.eval_prompts={prompts}", "data.prompts_per_step=2", "data.eval_size=2", "algorithm.group_size=2",
        "train.micro_batch=2", "train.eval_batch=2", "train.steps=1", "sampler.num_steps=3", "sampler.eval_num_steps=3",
        "logger=none", "train.progress=false", "train.num_threads=1", f"run_dir={run_dir}",
    ], timeout=300)
    config = (run_dir / "config.yaml").read_text()
    assert f"path: {folder}" in config and "models.unet.UNetPolicy" in config and "samplers.ddim.DDIMSampler" in config
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if "train/loss" in r)
    assert step["train/onpolicy_log_ratio_max"] == 0.0  # the recomputed log-probs equal the rollout's
    assert step["train/skipped_updates"] == 0 and step["train/grad_norm"] > 0
    assert -5 < step["reward/jpeg"] < 0  # minus the kB of a 16 px JPEG
    ckpt = run_dir / "checkpoints" / "step_000001"
    weights = load_file(ckpt / "policy.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all("lora_" in k for k in weights)
    assert max(float(v.abs().max()) for v in lora_b) > 0  # the step moved the adapters off their zero init
    assert all(torch.isfinite(v).all() for v in weights.values())

    # The trained checkpoint, rebuilt by its own config and exported, loads into the diffusers pipeline.
    from diffusers import StableDiffusionPipeline

    from launch.sample import load_policy

    policy, _ = load_policy(ckpt)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    x = torch.randn((1, *policy.latent_shape(SIZE, SIZE)), generator=torch.Generator().manual_seed(0))
    emb = policy.encode(["a red circle"]).prompt_embeds
    with torch.no_grad():
        base = pipe.unet(x, 500, encoder_hidden_states=emb).sample
        pipe.load_lora_weights(policy.save_lora(tmp_path / "lora"))
        exported = pipe.unet(x, 500, encoder_hidden_states=emb).sample
        trained = policy.unet(x, 500, encoder_hidden_states=emb).sample
    assert (exported - trained).abs().max() <= 1e-6
    assert (trained - base).abs().max() > 1e-4
