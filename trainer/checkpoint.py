"""Checkpoints: the DeepSpeed engine state plus the policy's trainable weights and the config.

A checkpoint directory is written under a temporary name and renamed only when complete, so a
reader never sees a half-written one.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from trainer.distributed import World, barrier

POLICY_FILE = "policy.safetensors"
CONFIG_FILE = "config.yaml"


def _full_parameters(engine, policy):
    """ZeRO-3 keeps only a shard of each parameter per rank: gather them (a collective, all ranks)."""
    if engine.zero_optimization_stage() != 3:
        return contextlib.nullcontext()
    import deepspeed

    params = [p for p in policy.transformer.parameters() if p.requires_grad]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def save_checkpoint(engine, policy, run_dir: Path, step: int, resolved_yaml: str, world: World) -> Path:
    """Write ``run_dir/checkpoints/step_<step>`` (all ranks take part; rank 0 finalises).

    Layout: engine/ (DeepSpeed: optimizer, LR schedule, ZeRO shards), policy.safetensors (trainable
    weights: LoRA adapters or the full transformer), config.yaml (resolved run config), meta.json.
    """
    final = run_dir / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    engine.save_checkpoint(str(tmp), tag="engine", client_state={"step": step})
    with _full_parameters(engine, policy):
        state = policy.trainable_state_dict() if world.is_main else None
    if world.is_main:
        save_file(state, str(tmp / POLICY_FILE))
        (tmp / CONFIG_FILE).write_text(resolved_yaml)
        (tmp / "meta.json").write_text(json.dumps({"step": step, "finetune": policy.finetune}) + "\n")
    barrier()
    if world.is_main:
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    barrier()
    return final
