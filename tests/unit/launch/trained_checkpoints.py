"""Checkpoints as the trainer writes them, built in-process without training (for export/sample tests).

The config is composed from the shipped ``conf/`` exactly as ``launch.train`` composes it and saved
resolved; the trainable weights are the adapter's own, moved far from their initial values so that
"the export reproduces the trained model" cannot hold by accident (a fresh LoRA is the identity).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[3]
STEP = 3

# model=sd3_5_medium on the tiny SD3 folder of tests/conftest.py (16 px, 16 T5 tokens). alpha != rank,
# so a LoRA reloaded without its alpha (diffusers then assumes alpha = rank) would not match.
TINY_SD3 = ["model=sd3_5_medium", "model.height=16", "model.width=16", "model.max_sequence_length=16",
            "model.dtype=float32", "model.lora_rank=4", "model.lora_alpha=8", "model.gradient_checkpointing=false"]


def compose_run_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from trainer.config import register

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


def perturb(policy, seed: int = 0, scale: float = 0.3) -> None:
    """LoRA B (zero at init) gets random values; a full fine-tune gets noise on every weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.transformer.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g)
            p.copy_(scale * noise if "lora_B" in name else p + 0.05 * noise)


def make_checkpoint(run_dir: Path, overrides: list[str], eval_rows: list[dict] | None = None):
    """Write ``run_dir/checkpoints/step_000003`` (config.yaml, policy.safetensors, trainer_state.json)
    and, if given, ``run_dir/metrics.jsonl``. Returns (checkpoint folder, the trained policy)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    dcfg = compose_run_config(overrides)
    ckpt = Path(run_dir) / "checkpoints" / f"step_{STEP:06d}"
    ckpt.mkdir(parents=True)
    (ckpt / "config.yaml").write_text(OmegaConf.to_yaml(dcfg, resolve=True))
    torch.manual_seed(0)
    policy = instantiate(dcfg.model, device="cpu", needs_reference=False)
    perturb(policy)
    save_file(policy.trainable_state_dict(), str(ckpt / "policy.safetensors"))
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": STEP}))
    if eval_rows is not None:
        (Path(run_dir) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    return ckpt, policy


def random_inputs(transformer, batch: int = 2, tokens: int = 5, seed: int = 1) -> dict:
    """Random SD3Transformer2DModel inputs shaped by its config (the text encoders play no part)."""
    c = transformer.config
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g),
        "timestep": torch.tensor([250.0, 800.0][:batch]),
        "encoder_hidden_states": torch.randn(batch, tokens, c.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(batch, c.pooled_projection_dim, generator=g),
    }


@torch.no_grad()
def transformer_out(transformer, inputs: dict) -> torch.Tensor:
    return transformer(**inputs, return_dict=False)[0]


def tiny_wan_folder(folder: Path) -> Path:
    """A 1-block random pixel-space Wan toy folder (WanPipeline layout, no VAE): the video family."""
    from models.toy.video import build, save

    return save(build(layers=1), folder)
