"""FLUX.1 family (dev, schnell and fine-tunes): FluxTransformer2DModel, CLIP-L (pooled) + T5-XXL, 16-ch VAE.

Loads any local diffusers folder laid out like ``black-forest-labs/FLUX.1-dev`` (a ``model_index.json``
naming the components). Everything follows ``FluxPipeline``, so a rollout with the ODE sampler equals
the pipeline's output for the same initial noise:
- guidance: FLUX.1-dev is guidance-distilled. ``guidance_scale`` is fed to the transformer's guidance
  embedding and every step costs one forward (no CFG, no negative prompt). FLUX.1-schnell has no
  guidance embedding and takes no guidance (guidance_scale must be <= 1).
- latents: at the sampler boundary they are the VAE's [B, C, h, w] (what the pipeline draws its noise
  in); ``predict`` packs them into 2x2 patches [B, h/2 * w/2, 4C] with their image ids, as the
  pipeline does, and unpacks the velocity. Every sampler operation is elementwise, so packing commutes.
- schedule: the pipeline's sigmas (linspace(1, 1/S, S)) shifted by mu, which grows linearly with the
  image's packed token count: ``sigmas`` uses the configured height and width.
- text: CLIP's pooled output and T5's last hidden state (max_sequence_length tokens, FLUX.1-dev 512,
  schnell 256); text ids are zeros.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.finetune import TransformerWeights
from models.sd3 import _dtype, load_component

# Attention projections of every block (the single blocks have to_q/k/v; their output projection is
# shared with the MLP, so it is left out): the targets Flow-GRPO and diffusers' FLUX LoRA scripts use.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@dataclass
class FluxCond:
    """Encoded prompts: T5 embeddings [B, T, D] and CLIP pooled [B, P]."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor


def shift_mu(image_seq_len: int, config) -> float:
    """The resolution-dependent shift of FLUX's schedule: linear in the packed token count, from
    base_shift at base_image_seq_len to max_shift at max_image_seq_len (scheduler config)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (top - base) / (max_len - base_len)
    return image_seq_len * slope + base - slope * base_len


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h/2 * w/2, 4C]: each 2x2 patch becomes one token, channels then rows then columns."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of ``pack`` for latents of height h and width w."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """[h/2 * w/2, 3] positions of the packed tokens: (0, row, column), FLUX's rope axes.

    Built on ``device`` directly: a host-to-device copy at every denoising step would be a sync point.
    """
    rows, cols = torch.meshgrid(torch.arange(h // 2, device=device), torch.arange(w // 2, device=device), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).to(dtype)


def check_folder(path: str, family: str, transformer_class: str, components: tuple[str, ...]) -> tuple[Path, dict]:
    """The folder and its model_index.json, after checking it holds a ``family`` checkpoint."""
    folder = Path(path).expanduser()
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(
            f"model.path={path!r} is not a diffusers folder: {index_file} is missing. "
            f"Point model.path at a local copy of a {family} checkpoint (the folder holding model_index.json)."
        )
    index = json.loads(index_file.read_text())
    found = (index.get("transformer") or [None, None])[1]
    if found != transformer_class:
        raise ValueError(f"model.path={path!r} is not a {family} checkpoint: its model_index.json names transformer "
                         f"class {found}, {family} needs {transformer_class}. Pick the model config of that family.")
    missing = [n for n in components if not (index.get(n) or [None])[0]]
    if missing:
        raise ValueError(f"{folder} lacks {family} components {missing} in model_index.json")
    return folder, index


class FluxPolicy:
    """FLUX.1-family adapter (see module docstring).

    Args:
      path: local diffusers folder with model_index.json (FluxPipeline layout).
      finetune: "lora" | "full" (see models.finetune.TransformerWeights).
      lora_rank, lora_alpha, lora_targets: LoRA shape; targets are module-name suffixes.
      dtype: "auto" (bf16 on GPU, fp32 on CPU) | "float32" | "bfloat16" | "float16".
      gradient_checkpointing: recompute transformer activations in backward.
      max_sequence_length: T5 tokens (FLUX.1-dev 512, schnell 256).
      height, width: image size in pixels (multiples of 16 for the 8x VAE); they also set the schedule's shift.
      schedule_shift: None = the pipeline's resolution-dependent shift (mu); a number s = a fixed shift of
        linspace(1, 0, S+1), sigma' = s sigma / (1 + (s - 1) sigma) (DanceGRPO's and MixGRPO's schedule, shift 3).
      needs_reference: full fine-tuning keeps a frozen copy for the KL term (the trainer sets it).
      device: where the model runs.
    """

    def __init__(
        self,
        path: str,
        finetune: str = "lora",
        lora_rank: int = 32,
        lora_alpha: float = 64.0,
        lora_targets: list[str] | tuple[str, ...] = DEFAULT_LORA_TARGETS,
        dtype: str = "auto",
        gradient_checkpointing: bool = False,
        max_sequence_length: int = 512,
        height: int = 512,
        width: int = 512,
        schedule_shift: float | None = None,
        needs_reference: bool = True,
        device: str | torch.device = "cpu",
    ):
        if schedule_shift is not None and not schedule_shift > 0:
            raise ValueError(f"model.schedule_shift ({schedule_shift}) must be > 0 (or null: the pipeline's shift)")
        self.schedule_shift = None if schedule_shift is None else float(schedule_shift)
        self.folder, index = check_folder(path, "FLUX.1", "FluxTransformer2DModel", (
            "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
        if finetune not in ("lora", "full"):
            raise ValueError(f"model.finetune must be 'lora' or 'full', got {finetune!r}")
        self.device = torch.device(device)
        self.dtype = _dtype(dtype, self.device)
        self.height, self.width = height, width
        self.max_sequence_length = max_sequence_length
        load = lambda name: load_component(self.folder, name, index[name], self.dtype)  # noqa: E731
        self.scheduler, self.vae = load("scheduler"), load("vae")
        self.clip, self.clip_tokenizer = load("text_encoder"), load("tokenizer")
        self.t5, self.t5_tokenizer = load("text_encoder_2"), load("tokenizer_2")
        transformer = load("transformer")
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.vae_scale_factor = factor
        if height % (2 * factor) or width % (2 * factor):
            raise ValueError(f"model.height/width ({height}x{width}) must be multiples of {2 * factor} "
                             f"(the VAE's {factor}x times FLUX's 2x2 packing)")
        for module in (self.vae, self.clip, self.t5):
            module.requires_grad_(False).eval().to(self.device)
        self.guidance_embeds = bool(transformer.config.guidance_embeds)
        self.weights = TransformerWeights(transformer.to(self.device), finetune, lora_rank, lora_alpha, lora_targets,
                                          needs_reference, gradient_checkpointing)
        self.transformer = self.weights.transformer
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def _encode_one(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """FLUX's prompt embedding for one prompt: T5 [1, T, D] and CLIP pooled [1, P]."""
        tok = self.clip_tokenizer
        ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.device)
        pooled = self.clip(ids, output_hidden_states=False).pooler_output.to(self.clip.dtype)
        ids = self.t5_tokenizer([prompt], padding="max_length", max_length=self.max_sequence_length, truncation=True,
                                return_tensors="pt").input_ids.to(self.device)
        embeds = self.t5(ids, output_hidden_states=False)[0].to(self.t5.dtype)
        return embeds, pooled

    def encode(self, prompts: list[str]) -> FluxCond:
        """Encode prompts with a per-prompt cache (on the CPU: FLUX's T5 embedding is ~4 MB per prompt in
        bf16). Each prompt is encoded alone, so its embedding is bitwise the same in any batch or rank."""
        for p in set(prompts):
            if p not in self._cache:
                self._cache[p] = tuple(t.cpu() for t in self._encode_one(p))
        embeds = torch.cat([self._cache[p][0] for p in prompts]).to(self.device)
        pooled = torch.cat([self._cache[p][1] for p in prompts]).to(self.device)
        return FluxCond(embeds, pooled)

    # ------------------------------------------------------------- denoiser
    def predict(self, x: torch.Tensor, sigma: torch.Tensor, cond: FluxCond, guidance_scale: float) -> torch.Tensor:
        """Velocity at (x, sigma): one forward, guidance_scale into the guidance embedding (FLUX.1-dev).

        x [B, C, h, w]; sigma [B] in [0, 1]. Returns [B, C, h, w] in the model dtype.
        """
        b, _, h, w = x.shape
        if self.guidance_embeds:
            # The transformer scales guidance by 1000 itself, as it does the timestep.
            guidance = torch.full((b,), float(guidance_scale), device=x.device, dtype=torch.float32)
        elif guidance_scale > 1.0:
            raise ValueError(f"sampler.guidance_scale={guidance_scale}, but this FLUX checkpoint (e.g. FLUX.1-schnell) "
                             "has no guidance embedding and takes no guidance: set sampler.guidance_scale=1")
        else:
            guidance = None
        text_ids = torch.zeros(cond.prompt_embeds.shape[1], 3, device=x.device, dtype=self.dtype)
        out = self.weights.active()(
            hidden_states=pack(x.to(self.dtype)),
            # The pipeline's timestep is the scheduler's sigma * 1000, divided by 1000 again: sigma,
            # kept in fp32 here (the transformer casts it to its dtype and rescales it).
            timestep=sigma.float(), guidance=guidance, pooled_projections=cond.pooled,
            encoder_hidden_states=cond.prompt_embeds, txt_ids=text_ids, img_ids=image_ids(h, w, x.device, self.dtype),
            return_dict=False,
        )[0]
        return unpack(out, h, w)

    def reference(self):
        """Within this context ``predict`` is the frozen reference policy (for the KL term)."""
        return self.weights.reference()

    # ---------------------------------------------------------- schedule/io
    def sigmas(self, num_steps: int) -> torch.Tensor:
        """[S+1] fp32 noise levels FluxPipeline uses for model.height x model.width images, ending at 0;
        with ``schedule_shift`` s, s t / (1 + (s - 1) t) over t = linspace(1, 0, S+1) instead."""
        if self.schedule_shift is not None:
            # float64 then one rounding to fp32, like the scheduler's own sigmas.
            t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
            s = self.schedule_shift
            return (s * t / (1 + (s - 1) * t)).float()
        h, w = self.latent_shape(self.height, self.width)[1:]
        mu = shift_mu((h // 2) * (w // 2), self.scheduler.config)
        sigmas = None if self.scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
        self.scheduler.set_timesteps(num_steps, sigmas=sigmas, mu=mu)
        return self.scheduler.sigmas.detach().float().cpu().clone()

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """(C, h, w): the VAE latent, h and w rounded down to even numbers as the pipeline does."""
        f = self.vae_scale_factor
        return (self.transformer.config.in_channels // 4, 2 * (height // (2 * f)), 2 * (width // (2 * f)))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> images [B, 3, H, W] fp32 in [0, 1]."""
        cfg = self.vae.config
        z = latents.to(self.vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        images = self.vae.decode(z, return_dict=False)[0].float()
        return (images / 2 + 0.5).clamp(0, 1)

    # ----------------------------------------------------------- weights
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self.weights.trainable_state_dict()

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.weights.load_trainable_state_dict(state)

    def save_lora(self, out_dir: str | Path) -> Path:
        """A diffusers LoRA folder: ``FluxPipeline.from_pretrained(base).load_lora_weights(out_dir)``."""
        from diffusers import FluxPipeline

        return self.weights.save_lora(out_dir, FluxPipeline)

    def save_merged(self, out_dir: str | Path) -> Path:
        """A full diffusers folder with the trained transformer: ``FluxPipeline.from_pretrained(out_dir)``."""
        return self.weights.save_merged(out_dir, self.folder)
