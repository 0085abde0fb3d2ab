"""The trainable part of a diffusers transformer: LoRA or full fine-tuning, the reference policy, the
trainable state, and export back to diffusers (a LoRA folder, or a merged checkpoint folder).

Every family adapter (models/sd3.py, flux.py, qwen_image.py, wan.py, unet.py) holds one
``TransformerWeights`` and delegates to it; nothing here depends on the family except the pipeline class
passed to ``save_lora`` and the network's component name (``component``: "unet" for SD1.x/SDXL).
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
      component: the network's name in the pipeline: its folder in a diffusers checkpoint (what
        ``save_merged`` replaces) and the prefix of its LoRA keys (``save_lora``). "transformer" for the
        DiT families, "unet" for SD1.x/SDXL.
    """

    def __init__(self, transformer: torch.nn.Module, finetune: str, lora_rank: int, lora_alpha: float,
                 lora_targets, needs_reference: bool, gradient_checkpointing: bool, component: str = "transformer"):
        if finetune not in ("lora", "full"):
            raise ValueError(f"model.finetune must be 'lora' or 'full', got {finetune!r}")
        self.transformer, self.finetune, self.component = transformer, finetune, component
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
    def save_lora(self, out_dir: str | Path, pipeline_cls, diffusers_keys: bool = False) -> Path:
        """Write the adapters as a diffusers LoRA folder (``pytorch_lora_weights.safetensors``, keys under
        ``<component>.``): ``pipeline_cls.from_pretrained(base).load_lora_weights(out_dir)`` then
        computes what this policy computes.

        The peft config (rank, alpha, targets; the targets sorted, so the file's bytes do not depend on
        set order) goes with the weights as adapter metadata, so the loader applies alpha / rank, not a
        default scale of 1. Weights are saved in fp32 (as trained). ``diffusers_keys`` renames peft's
        keys to diffusers' own LoRA names (``convert_state_dict_to_diffusers``: ``lora_A`` ->
        ``lora.down``), the form diffusers' SD1.x/SDXL LoRA scripts write.
        """
        if self.finetune != "lora":
            raise ValueError("save_lora needs model.finetune=lora: a full fine-tune trains every weight, so there "
                             "is no LoRA to save; export a merged folder (save_merged; python -m launch.export ... "
                             "merge=true)")
        from peft.utils import get_peft_model_state_dict

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        layers = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.transformer).items()}
        if diffusers_keys:
            from diffusers.utils import convert_state_dict_to_diffusers

            layers = convert_state_dict_to_diffusers(layers)
        metadata = self.transformer.peft_config["default"].to_dict()
        metadata["target_modules"] = sorted(metadata["target_modules"])
        pipeline_cls.save_lora_weights(out, **{f"{self.component}_lora_layers": layers,
                                               f"{self.component}_lora_adapter_metadata": metadata})
        return out

    @torch.no_grad()
    def merged(self) -> torch.nn.Module:
        """The network as a plain diffusers model (no peft layers) with the LoRA folded in: W + (alpha / r)
        B A per adapted layer, summed in fp32 and stored in the base weight's dtype (one rounding on a
        bf16 base). A full fine-tune is the network itself.

        Built from a merged state dict rather than by merging in place: the policy's own modules are
        untouched and no second copy of the frozen weights is made (the plain model shares them).
        Raises ValueError if a merged weight is not finite.
        """
        if self.finetune != "lora":
            return self.transformer
        from peft.tuners.tuners_utils import BaseTunerLayer

        state = {}
        for key, value in self.transformer.state_dict().items():
            parts = key.split(".")
            if any(part.startswith("lora_") for part in parts):
                continue  # adapter weights: folded into the base weight below
            state[".".join(part for part in parts if part != "base_layer")] = value
        for name, module in self.transformer.named_modules():
            if isinstance(module, BaseTunerLayer):
                weight = module.get_base_layer().weight
                merged = (weight.float() + module.get_delta_weight("default").float()).to(weight.dtype)
                if not torch.isfinite(merged).all():
                    raise ValueError(f"the merged weight of {name} is not finite: the adapter is broken")
                state[f"{name}.weight"] = merged
        with torch.device("meta"):  # no memory for weights that load_state_dict(assign=True) replaces
            plain = type(self.transformer).from_config(self.transformer.config)
        plain.load_state_dict(state, strict=True, assign=True)  # strict: every base weight accounted for
        return plain

    def save_merged(self, out_dir: str | Path, base_folder: Path) -> Path:
        """Write a complete diffusers folder: every entry of ``base_folder`` but the network's, and the
        network from ``merged()`` (the LoRA folded in, or the fully fine-tuned weights) in the base dtype.

        The files inside the base's component folders are hard links where the file system allows
        (copies otherwise): replace them, never write into them. Top-level files (model_index.json,
        README.md, ...) are copied, so a caller may rewrite them; model_index.json comes last, so a
        folder cut short does not load.
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
        index = out / "model_index.json"
        index.unlink(missing_ok=True)
        for entry in base_folder.iterdir():
            target = out / entry.name
            if entry.name in (self.component, index.name):
                continue
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            if entry.is_dir():
                shutil.copytree(entry, target, copy_function=link_or_copy)
            else:
                shutil.copy2(entry, target)
        shutil.rmtree(out / self.component, ignore_errors=True)
        self.merged().save_pretrained(out / self.component)
        shutil.copy2(base_folder / index.name, index)
        return out
