"""DeepSpeed engine around the policy's trainable network."""
from __future__ import annotations

import torch
from hydra.utils import instantiate


def deepspeed_config(ds_cfg, micro_batch: int, grad_accum: int, world_size: int, max_grad_norm: float,
                     model_dtype: torch.dtype) -> dict:
    """The DeepSpeed JSON config derived from steerflow's typed knobs (never written by hand).

    precision "auto" follows the model's dtype (model.dtype): DeepSpeed's bf16 mode casts the module,
    so a different choice here would feed bf16 weights fp32 inputs (or the reverse).
    """
    model_precision = "bf16" if model_dtype == torch.bfloat16 else "fp32"
    precision = model_precision if ds_cfg.precision == "auto" else ds_cfg.precision
    if precision != model_precision:
        raise ValueError(
            f"deepspeed.precision={ds_cfg.precision!r} disagrees with the model's dtype ({model_dtype}); "
            "set deepspeed.precision=auto, or model.dtype to match"
        )
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": {"stage": ds_cfg.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 1 << 30,  # steerflow logs; DeepSpeed's own prints would interleave with the bar
        "wall_clock_breakdown": False,
    }


def build_engine(policy, optimizer_cfg, ds_cfg, micro_batch: int, grad_accum: int, world_size: int, max_grad_norm: float):
    """Wrap ``policy.transformer`` in a DeepSpeed engine with the configured torch optimizer.

    ``optimizer_cfg`` is a Hydra node with ``_partial_: true`` (e.g. torch.optim.AdamW); it gets the
    trainable parameters only (LoRA adapters, or everything for full fine-tuning).
    """
    import deepspeed

    params = [p for p in policy.transformer.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the policy has no trainable parameters; check model.finetune and model.lora_targets")
    optimizer = instantiate(optimizer_cfg)(params)
    config = deepspeed_config(ds_cfg, micro_batch, grad_accum, world_size, max_grad_norm, policy.dtype)
    engine, optimizer, _, _ = deepspeed.initialize(model=policy.transformer, optimizer=optimizer, config=config)
    return engine, optimizer


def optimizer_step(engine) -> float | None:
    """``engine.step()``; at an accumulation boundary also return the global gradient norm (pre-clipping).

    ZeRO 0 keeps whole, already all-reduced gradients in ``p.grad``, and DeepSpeed does not record
    their norm, so it is computed here before the step; ZeRO >= 1 partitions gradients and DeepSpeed
    computes the norm during its step, so it is read afterwards.
    """
    boundary = engine.is_gradient_accumulation_boundary()
    norm = None
    if boundary and engine.zero_optimization_stage() == 0:
        grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
        norm = float(torch.stack(grads).norm()) if grads else 0.0
    engine.step()
    if boundary and norm is None:
        norm = float(engine.get_global_grad_norm())
    return norm
