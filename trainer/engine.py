"""DeepSpeed engine around the policy's trainable network, and the guard that keeps non-finite updates out."""
from __future__ import annotations

import torch
from hydra.utils import instantiate

from trainer.distributed import all_reduce_max


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


class NonFiniteGuard:
    """Skips, on every rank, an optimizer step whose gradients hold a NaN or inf.

    It gives the torch optimizer a subclass whose ``step`` checks first, so it runs wherever
    DeepSpeed calls it: after the all-reduce (ZeRO 0) or on each rank's fp32 partition after
    reduction and clipping (ZeRO 1-3). (A subclass, not an instance attribute: torch LR schedulers
    re-bind ``optimizer.step`` and would drop a patched attribute.) One all-reduce makes every rank
    agree, because under ZeRO each rank sees only its shard. A skipped step leaves weights and
    optimizer state untouched (DeepSpeed clears the grads). ``force_skip`` lets the loop veto the
    step (e.g. a non-finite loss with finite gradients).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, outer=None):
        """``outer``: the optimizer object DeepSpeed steps (``engine.optimizer``), if it wraps ``optimizer``."""
        self.optimizer, self.outer = optimizer, outer
        self.force_skip = False
        self.last_skipped = False
        base, guard = type(optimizer), self

        def step(opt, closure=None):
            if guard._skip(opt):
                return None
            return base.step(opt, closure)

        optimizer.__class__ = type(f"Guarded{base.__name__}", (base,), {"step": step})

    def before_boundary(self) -> None:
        self.last_skipped = False

    def _skip(self, opt) -> bool:
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        bad = self.force_skip
        if grads and not bad:
            # One flag for all tensors: one device sync instead of one per parameter.
            bad = not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        flag = torch.tensor([1.0 if bad else 0.0], device=grads[0].device if grads else "cpu")
        self.last_skipped = bool(all_reduce_max(flag)[0] > 0)
        self.force_skip = False
        # After the step DeepSpeed reads ``overflow`` from the optimizer it stepped (the torch one for
        # ZeRO 0, its ZeRO wrapper otherwise): it then counts the step as skipped and does not advance
        # the LR schedule. The wrapper's own flag is only ever raised here, never cleared.
        opt.overflow = self.last_skipped
        if self.outer is not None and self.outer is not opt and self.last_skipped:
            self.outer.overflow = True
        return self.last_skipped


def build_engine(
    policy, optimizer_cfg, ds_cfg, micro_batch: int, grad_accum: int, world_size: int, max_grad_norm: float,
    scheduler_cfg=None, load_universal: bool = False,
):
    """Wrap ``policy.transformer`` in a DeepSpeed engine with the configured torch optimizer.

    ``optimizer_cfg`` is a Hydra node with ``_partial_: true`` (e.g. torch.optim.AdamW); it gets the
    trainable parameters only (LoRA adapters, or everything for full fine-tuning). ``scheduler_cfg``
    (optional, ``_partial_: true``) is a torch LR scheduler over that optimizer; DeepSpeed steps it
    once per optimizer step that is applied and saves it in checkpoints.
    Returns (engine, the torch optimizer, NonFiniteGuard).
    """
    import deepspeed

    params = [p for p in policy.transformer.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the policy has no trainable parameters; check model.finetune and model.lora_targets")
    optimizer = instantiate(optimizer_cfg)(params)
    config = deepspeed_config(ds_cfg, micro_batch, grad_accum, world_size, max_grad_norm, policy.dtype)
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(model=policy.transformer, optimizer=optimizer, config=config)
    # After initialize: ZeRO accepts only the exact optimizer classes it knows, and the guard subclasses it.
    guard = NonFiniteGuard(optimizer, engine.optimizer)
    if scheduler_cfg:
        # Built over the guarded optimizer (a scheduler re-binds ``step`` at construction) and handed
        # to the engine, which steps it after each applied optimizer step and checkpoints its state.
        engine.lr_scheduler = instantiate(scheduler_cfg)(optimizer)
    return engine, optimizer, guard


def optimizer_step(engine, guard: NonFiniteGuard) -> tuple[float | None, bool]:
    """``engine.step()``; at an accumulation boundary return (global gradient norm before clipping,
    whether the step was skipped as non-finite), else (None, False).

    ZeRO 0 keeps whole, already all-reduced gradients in ``p.grad``, and DeepSpeed does not record
    their norm, so it is computed here before the step; ZeRO >= 1 partitions gradients and DeepSpeed
    computes the norm during its step, so it is read afterwards. A step counts as skipped when the
    guard vetoed it or DeepSpeed's own overflow check did (ZeRO >= 1 checks fp32 gradient norms).
    """
    boundary = engine.is_gradient_accumulation_boundary()
    if not boundary:
        engine.step()
        return None, False
    norm = None
    if engine.zero_optimization_stage() == 0:
        grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
        norm = float(torch.stack(grads).norm()) if grads else 0.0
    skipped_before = engine.skipped_steps
    guard.before_boundary()
    engine.step()
    guard.force_skip = False  # consumed (DeepSpeed may have skipped the step before the guard ran)
    if norm is None:
        norm = float(engine.get_global_grad_norm())
    return norm, guard.last_skipped or engine.skipped_steps > skipped_before
