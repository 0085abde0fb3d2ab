"""Wan 2.1 / 2.2 text-to-video family: WanTransformer3DModel, UMT5 text encoder, causal 3-D video VAE.

Loads any local diffusers folder laid out like ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` (or Wan2.1-T2V-14B,
Wan2.2-TI2V-5B). The text encoding, timestep conditioning, classifier-free guidance with a negative
prompt and the latent (un)normalisation follow ``WanPipeline``, so the policy's ODE samples are the
pipeline's. Without a VAE (``vae: [null, null]``) the model works in pixel space: the embedded video
toy (models/toy/video.py) is such a folder.

Tensor conventions (models/policy.py): latents [B, C, F', h, w] with F' = (F - 1) / 4 + 1 latent frames
for Wan's 4x temporal VAE (F' = F in pixel space); videos [B, F, 3, H, W] in [0, 1].

Not supported: Wan 2.2 A14B's two experts (``boundary_ratio`` with ``transformer_2``) -- a clear error.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from models.finetune import TransformerWeights
from models.sd3 import _dtype, load_component

# Self-attention (attn1) and text cross-attention (attn2) projections of every block: the LoRA targets
# DanceGRPO uses for Wan and the attention part of the usual Wan LoRA recipes. Add ffn.net.0.proj and
# ffn.net.2 to adapt the feed-forward layers too (more capacity, ~2x the adapter size).
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class WanCond:
    """Encoded prompts: prompt_embeds [B, T, D] zero beyond each prompt's tokens; the negative prompt's the same."""

    prompt_embeds: torch.Tensor
    neg_prompt_embeds: torch.Tensor


class WanPolicy:
    """Wan-family adapter (see module docstring).

    Args:
      path: local diffusers folder with model_index.json (a WanPipeline folder, or the toy's).
      finetune: "lora" | "full" (see models.finetune.TransformerWeights).
      lora_rank, lora_alpha, lora_targets: LoRA shape; targets are module-name suffixes.
      dtype: "auto" (bf16 on GPU, fp32 on CPU) | "float32" | "bfloat16" | "float16".
      gradient_checkpointing: recompute transformer activations in backward (needed for 14B / long clips).
      max_sequence_length: UMT5 tokens (WanPipeline's default is 512 in the original code, 226 in the pipeline).
      negative_prompt: the CFG negative prompt ("" is WanPipeline's default; Wan's authors use a long list of
        artefacts). Used only when guidance_scale > 1.
      num_frames: frames generated per video; must be 1 + a multiple of the VAE's temporal factor (4).
      height, width: frame size in pixels; multiples of the VAE's spatial factor times the patch size.
      flow_shift: null keeps the checkpoint scheduler's shift (Wan 2.1 480p ships 3.0; 5.0 suits 720p);
        a number replaces it.
      needs_reference: full fine-tuning keeps a frozen copy for the KL term (the trainer sets it).
      device: where the model runs.
    """

    def __init__(
        self,
        path: str,
        finetune: str = "lora",
        lora_rank: int = 32,
        lora_alpha: float = 32.0,
        lora_targets: list[str] | tuple[str, ...] = DEFAULT_LORA_TARGETS,
        dtype: str = "auto",
        gradient_checkpointing: bool = False,
        max_sequence_length: int = 226,
        negative_prompt: str = "",
        num_frames: int = 33,
        height: int = 480,
        width: int = 832,
        flow_shift: float | None = None,
        needs_reference: bool = True,
        device: str | torch.device = "cpu",
    ):
        folder = Path(path).expanduser()
        index_file = folder / "model_index.json"
        if not index_file.is_file():
            raise FileNotFoundError(
                f"model.path={path!r} is not a diffusers folder: {index_file} is missing. "
                "Point model.path at a local copy of a Wan checkpoint in diffusers format (the folder holding "
                "model_index.json, e.g. Wan2.1-T2V-1.3B-Diffusers)."
            )
        if finetune not in ("lora", "full"):
            raise ValueError(f"model.finetune must be 'lora' or 'full', got {finetune!r}")
        index = json.loads(index_file.read_text())
        if index.get("boundary_ratio") is not None or (index.get("transformer_2") or [None])[0] is not None:
            raise ValueError(
                f"{folder} is a two-expert Wan 2.2 checkpoint (boundary_ratio / transformer_2): not supported yet. "
                "Use a single-transformer Wan 2.1 or Wan 2.2 TI2V-5B folder."
            )
        self.folder = folder
        self.device = torch.device(device)
        self.dtype = _dtype(dtype, self.device)
        self.height, self.width, self.num_frames = height, width, num_frames
        self.max_sequence_length = max_sequence_length
        self.negative_prompt = negative_prompt
        # Wan 2.2 TI2V-5B conditions every token on its own timestep (all equal in text-to-video).
        self.expand_timesteps = bool(index.get("expand_timesteps", False))

        def component(name, required, dtype=self.dtype):
            spec = index.get(name)
            if not spec or spec[0] is None:
                if required:
                    raise ValueError(f"{folder} has no {name!r} in model_index.json; a Wan folder needs one")
                return None
            return load_component(folder, name, spec, dtype)

        self.scheduler = component("scheduler", True)
        self._shift_overridden = flow_shift is not None
        if flow_shift is not None:
            key = "flow_shift" if "flow_shift" in self.scheduler.config else "shift"
            self.scheduler = type(self.scheduler).from_config(self.scheduler.config, **{key: float(flow_shift)})
        # The VAE stays fp32 even on GPU, as Wan's own examples load it: its decoded frames lose visible
        # detail in bf16, and decoding once per sample costs little beside the denoising steps.
        self.vae = component("vae", False, torch.float32)
        self.text_encoder = component("text_encoder", True)
        self.tokenizer = component("tokenizer", True)
        self.transformer = component("transformer", True)
        for module in (self.vae, self.text_encoder):
            if module is not None:
                module.requires_grad_(False).eval().to(self.device)
        self._check_sizes()
        self.weights = TransformerWeights(self.transformer.to(self.device), finetune, lora_rank, lora_alpha,
                                          lora_targets, needs_reference, gradient_checkpointing)
        self.transformer = self.weights.transformer
        self._cache: dict[str, torch.Tensor] = {}

    def _check_sizes(self) -> None:
        """Frame count and size must fit the VAE's factors and the patch size (WanPipeline would round)."""
        t_factor, s_factor = self._factors()
        _, ph, pw = self.transformer.config.patch_size
        problems = []
        if (self.num_frames - 1) % t_factor:
            problems.append(f"model.num_frames ({self.num_frames}) - 1 must be divisible by the VAE's temporal factor {t_factor}")
        for name, size, p in (("height", self.height, ph), ("width", self.width, pw)):
            if size % (s_factor * p):
                problems.append(f"model.{name} ({size}) must be a multiple of {s_factor * p} (VAE factor {s_factor} x patch {p})")
        if problems:
            raise ValueError("; ".join(problems))

    def _factors(self) -> tuple[int, int]:
        if self.vae is None:
            return 1, 1
        return self.vae.config.scale_factor_temporal, self.vae.config.scale_factor_spatial

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def _encode_one(self, prompt: str) -> torch.Tensor:
        """WanPipeline's UMT5 embedding of one prompt: [1, max_sequence_length, D], zero past its tokens."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        inputs = self.tokenizer(
            [prompt_clean(prompt)], padding="max_length", max_length=self.max_sequence_length, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        mask = inputs.attention_mask.to(self.device)
        hidden = self.text_encoder(inputs.input_ids.to(self.device), mask).last_hidden_state
        # Padding positions are zeroed, not masked: Wan's cross-attention sees all T positions.
        n = int(mask.sum())
        out = torch.zeros_like(hidden)
        out[:, :n] = hidden[:, :n]
        return out.to(self.dtype)

    def encode(self, prompts: list[str]) -> WanCond:
        """Encode prompts and the negative prompt, cached per prompt on the CPU.

        One prompt at a time, so each embedding is bitwise the same whatever batch or rank it is in.
        """
        for p in {*prompts, self.negative_prompt}:
            if p not in self._cache:
                self._cache[p] = self._encode_one(p).cpu()
        emb = torch.cat([self._cache[p] for p in prompts]).to(self.device)
        neg = self._cache[self.negative_prompt].to(self.device)
        return WanCond(emb, neg.expand(len(prompts), -1, -1))

    # ------------------------------------------------------------- denoiser
    def predict(self, x: torch.Tensor, sigma: torch.Tensor, cond: WanCond, guidance_scale: float) -> torch.Tensor:
        """Velocity at (x, sigma), with CFG against the negative prompt when guidance_scale > 1.

        x [B, C, F', h, w]; sigma [B] in [0, 1]. Returns [B, C, F', h, w] in the model dtype.
        """
        cfg = guidance_scale > 1.0
        x_in = torch.cat([x, x]) if cfg else x
        emb = torch.cat([cond.neg_prompt_embeds, cond.prompt_embeds]) if cfg else cond.prompt_embeds
        # The flow-matching scheduler's timesteps are sigma * num_train_timesteps, in fp32.
        timestep = (torch.cat([sigma, sigma]) if cfg else sigma).float() * self.scheduler.config.num_train_timesteps
        if self.expand_timesteps:
            pt, ph, pw = self.transformer.config.patch_size
            tokens = (x.shape[2] // pt) * (x.shape[3] // ph) * (x.shape[4] // pw)
            timestep = timestep[:, None].expand(-1, tokens)
        out = self.weights.active()(hidden_states=x_in.to(self.dtype), timestep=timestep, encoder_hidden_states=emb, return_dict=False)[0]
        if not cfg:
            return out
        uncond, text = out.chunk(2)
        return uncond + guidance_scale * (text - uncond)

    def reference(self):
        """Within this context ``predict`` is the frozen reference policy (for the KL term)."""
        return self.weights.reference()

    # ---------------------------------------------------------- schedule/io
    def sigmas(self, num_steps: int) -> torch.Tensor:
        """[S+1] fp32 noise levels of the checkpoint's scheduler (its shift included), ending at 0.

        Wan's diffusers folders ship UniPCMultistepScheduler with flow sigmas; its sigma table is used
        with steerflow's samplers (the pipeline's multistep solver is not: RL needs per-step Gaussians).
        """
        self.scheduler.set_timesteps(num_steps)
        sigmas = self.scheduler.sigmas.detach().float().cpu().clone()
        if sigmas[-1] != 0:
            raise ValueError(f"the scheduler's last sigma is {float(sigmas[-1])}, not 0: set its final_sigmas_type='zero'")
        return sigmas

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """(C, F', h, w) for ``num_frames`` frames of height x width pixels."""
        t_factor, s_factor = self._factors()
        frames = (self.num_frames - 1) // t_factor + 1
        return (self.transformer.config.in_channels, frames, height // s_factor, width // s_factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, F', h, w] -> videos [B, F, 3, H, W] fp32 in [0, 1]."""
        if self.vae is None:
            video = latents.float()  # pixel space: the model generates [-1, 1] frames directly
        else:
            cfg = self.vae.config
            z = latents.to(self.vae.dtype)
            mean = torch.tensor(cfg.latents_mean, device=z.device, dtype=z.dtype).view(1, cfg.z_dim, 1, 1, 1)
            std = torch.tensor(cfg.latents_std, device=z.device, dtype=z.dtype).view(1, cfg.z_dim, 1, 1, 1)
            # As WanPipeline: divide by the reciprocal (not multiply by std) so fp rounding matches.
            z = z / (1.0 / std) + mean
            video = self.vae.decode(z, return_dict=False)[0].float()  # [B, 3, F, H, W] in [-1, 1]
        return (video.permute(0, 2, 1, 3, 4) / 2 + 0.5).clamp(0, 1)

    # ----------------------------------------------------------- weights
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self.weights.trainable_state_dict()

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.weights.load_trainable_state_dict(state)

    def save_lora(self, out_dir: str | Path) -> Path:
        """A diffusers LoRA folder: ``WanPipeline.from_pretrained(base).load_lora_weights(out_dir)`` then
        reproduces this policy. Raises ValueError for full fine-tuning (there is no adapter: use save_merged)."""
        from diffusers import WanPipeline

        return self.weights.save_lora(out_dir, WanPipeline)

    def save_merged(self, out_dir: str | Path) -> Path:
        """Write a complete diffusers folder (the base's other components + the merged transformer):
        ``WanPipeline.from_pretrained(out_dir)`` loads it; weights keep the base's dtype. A flow_shift
        override is written into its scheduler (the shift trained with, not the base's)."""
        out = self.weights.save_merged(out_dir, self.folder)
        if self._shift_overridden:
            # The scheduler folder's files are hard links to the base's: replace them, never write through.
            shutil.rmtree(out / "scheduler")
            self.scheduler.save_pretrained(out / "scheduler")
        return out
