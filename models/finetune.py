"""The trainable part of a diffusers transformer: LoRA or full fine-tuning, the reference policy, the
trainable state, and export back to diffusers (a LoRA folder, or a merged checkpoint folder).

Family adapters (models/flux.py, models/qwen_image.py) hold one ``TransformerWeights`` and delegate to
it; nothing here depends on the family except the pipeline class passed to ``save_lora``.
"""
from __future__ import annotations

import contextlib
import copy
import os
import shutil
from pathlib import Path

import torch


class TransformerWeights:
    """Sets up ``transformer`` for fine-tuning and answers for its trainable weights.

    Args:
      transformer: a diffusers ModelMixin already on its device and in its base dtype.
      finetune: "lora" (peft adapters on ``lora_targets``, module-name suffixes; the reference policy
        is the adapters disabled) or "full" (every weight trains; the reference is a frozen copy,
        made only when ``needs_reference``).
      gradient_checkpointing: recompute the blocks' activations in backward.
    """

    def __init__(self, transformer: torch.nn.Module, finetune: str, lora_rank: int, lora_alpha: float,
                 lora_targets, needs_reference: bool, gradient_checkpointing: bool):
        if finetune not in ("lora", "full"):
            raise ValueError(f"model.finetune must be 'lora' or 'full', got {finetune!r}")
        self.transformer, self.finetune = transformer, finetune
        self.frozen_copy = None
        self.use_reference = False
        if finetune == "lora":
            from peft import LoraConfig

            transformer.requires_grad_(False)
            transformer.add_adapter(LoraConfig(
                r=lora_rank, lora_alpha=lora_alpha, init_lora_weights="gaussian", target_modules=list(lora_targets)))
            # Adapters in fp32 even on a bf16 base (their updates are small relative to the weights);
            # DeepSpeed's bf16 mode keeps fp32 master copies and computes in bf16.
            for p in transformer.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            transformer.requires_grad_(True)
            if needs_reference:
                self.frozen_copy = copy.deepcopy(transformer).requires_grad_(False).eval()
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing()

    def active(self) -> torch.nn.Module:
        """The network ``predict`` must call now: the frozen copy inside ``reference()`` (full mode)."""
        return self.frozen_copy if self.use_reference else self.transformer

    @contextlib.contextmanager
    def reference(self):
        """Within this context the transformer computes the frozen reference policy (for the KL term)."""
        if self.finetune == "lora":
            self.transformer.disable_adapters()
            try:
                yield
            finally:
                self.transformer.enable_adapters()
            return
        if self.frozen_copy is None:
            raise RuntimeError("full fine-tuning without a reference copy: set model.needs_reference=true")
        self.use_reference = True
        try:
            yield
        finally:
            self.use_reference = False

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.transformer.named_parameters() if v.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` into the trainable weights; unknown keys fail before anything is written."""
        params = dict(self.transformer.named_parameters())
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise KeyError(f"checkpoint has weights this model lacks (first: {unknown[:3]}); was it trained on another base?")
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)

    # ------------------------------------------------------------------ export
    def save_lora(self, out_dir: str | Path, pipeline_cls) -> Path:
        """Write the adapters as a diffusers LoRA folder: ``pipeline_cls.from_pretrained(base)
        .load_lora_weights(out_dir)`` then computes what this policy computes.

        The peft config (rank, alpha, targets) goes with the weights as adapter metadata, so the
        loader applies alpha / rank, not a default scale of 1. Weights are saved in fp32 (as trained).
        """
        if self.finetune != "lora":
            raise ValueError("save_lora needs model.finetune=lora; a fully fine-tuned model exports only merged "
                             "(save_merged; python -m launch.export ... merge=true)")
        from peft.utils import get_peft_model_state_dict

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        layers = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.transformer).items()}
        pipeline_cls.save_lora_weights(
            out, transformer_lora_layers=layers,
            transformer_lora_adapter_metadata=self.transformer.peft_config["default"].to_dict(),
        )
        return out

    def save_merged(self, out_dir: str | Path, base_folder: Path) -> Path:
        """Write a complete diffusers folder: every component of ``base_folder`` but the transformer
        (hard links where the file system allows, copies otherwise), and the trained transformer with
        the LoRA merged into its weights (or the fully fine-tuned weights), in the base dtype.
        """
        out = Path(out_dir)
        if out.resolve() == base_folder.resolve():
            raise ValueError(f"save_merged would overwrite the base checkpoint {base_folder}; choose another folder")

        def link_or_copy(src, dst):
            try:
                os.link(src, dst)  # same bytes, no second copy of multi-GB text encoders
            except OSError:
                shutil.copy2(src, dst)

        out.mkdir(parents=True, exist_ok=True)
        for entry in base_folder.iterdir():
            target = out / entry.name
            if entry.name == "transformer":
                continue
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            if entry.is_dir():
                shutil.copytree(entry, target, copy_function=link_or_copy)
            else:
                link_or_copy(entry, target)
        merged = copy.deepcopy(self.transformer)
        if self.finetune == "lora":
            # W + (alpha / r) B A per adapted layer, computed by peft in the base weight's dtype (fp32
            # adapters on a bf16 base give a bf16 checkpoint); safe fusing fails on a non-finite result.
            merged.fuse_lora(safe_fusing=True)
            merged.unload_lora()
        shutil.rmtree(out / "transformer", ignore_errors=True)
        merged.save_pretrained(out / "transformer")
        return out
