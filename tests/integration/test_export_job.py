"""Train -> export -> diffusers: a 1-step GRPO run of model=sd3_5_medium on a tiny SD3 folder through the
training CLI, exported as LoRA and merged, loads into StableDiffusion3Pipeline and reproduces the
trained transformer; the card carries the run's own evaluation; the export CLI refuses to overwrite.

The exports run in-process (each CLI start costs ~7 s of imports, over this test's budget); the CLI's
own plumbing (Hydra parsing of ExportConfig, main()) is run by the refusal at the end."""
from __future__ import annotations

import json
import sys

from jobs import run, train

TOL = 1e-5


def test_trained_run_exports_to_diffusers(tmp_path, tiny_sd3_dir):
    import torch
    from diffusers import StableDiffusion3Pipeline

    from launch.export import ExportConfig, export
    from launch.sample import load_policy

    run_dir = tmp_path / "run"
    train(run_dir, "model=sd3_5_medium", f"model.path={tiny_sd3_dir}", "model.height=16", "model.width=16",
          "model.max_sequence_length=16", "model.dtype=float32", "model.lora_rank=4", "model.lora_alpha=8",
          "model.gradient_checkpointing=false", "train.steps=1", "sampler.num_steps=4", "sampler.eval_num_steps=4",
          # A large step, so the trained transformer is far from the base (a fresh LoRA is the identity).
          "optimizer.lr=0.05")
    ckpt = run_dir / "checkpoints" / "step_000001"
    export(ExportConfig(checkpoint=str(ckpt), out=str(tmp_path / "lora")))

    policy, _ = load_policy(ckpt)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    cond = policy.encode(["a red circle", "two blue squares"])
    inputs = {"hidden_states": torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0)),
              "timestep": torch.tensor([300.0, 900.0]), "encoder_hidden_states": cond.prompt_embeds,
              "pooled_projections": cond.pooled, "return_dict": False}
    with torch.no_grad():
        trained, base = policy.transformer(**inputs)[0], pipe.transformer(**inputs)[0]
        assert (trained - base).abs().max() > 1000 * TOL
        pipe.load_lora_weights(tmp_path / "lora")
        assert (pipe.transformer(**inputs)[0] - trained).abs().max() <= TOL

        export(ExportConfig(checkpoint=str(ckpt), out=str(tmp_path / "merged"), merge=True))
        merged = StableDiffusion3Pipeline.from_pretrained(tmp_path / "merged")
        assert (merged.transformer(**inputs)[0] - trained).abs().max() <= TOL

    card = (tmp_path / "lora" / "README.md").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    jpeg_before, jpeg_after = summary["eval_before"]["eval/jpeg"], summary["eval_after"]["eval/jpeg"]
    assert f"| eval/jpeg | {jpeg_before:.4g} | {jpeg_after:.4g} |" in card
    assert "| steps | 1 of train.steps=1," in card and "| jpeg (trained) | 1 |" in card

    proc = run([sys.executable, "-m", "launch.export", f"checkpoint={ckpt}", f"out={tmp_path / 'lora'}", "merge=true"],
               expect=2)  # a user error (trainer/errors.py): one message, no traceback
    assert "is not empty" in proc.stderr and "overwrite=true" in proc.stderr
    assert (tmp_path / "lora" / "README.md").read_text() == card