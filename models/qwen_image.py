"""Qwen-Image family: QwenImageTransformer2DModel (MMDiT), a Qwen2.5-VL text encoder, AutoencoderKLQwenImage.

Loads any local diffusers folder laid out like ``Qwen/Qwen-Image`` (a ``model_index.json`` naming the
components). Everything follows ``QwenImagePipeline``, so an ODE rollout equals the pipeline's output
for the same initial noise:
- text: the prompt inside Qwen-Image's chat template goes through the Qwen2.5-VL language model; the
  last hidden layer, without the template's first 34 tokens and without padding, is the prompt
  embedding (variable length: a batch is zero-padded with a mask, as in the pipeline).
- guidance: true classifier-free guidance with a negative prompt (Qwen-Image is not guidance-distilled):
  with guidance_scale > 1 each step runs the prompt and the negative prompt (two forwards, as the
  pipeline does) and mixes them as neg + s * (cond - neg), rescaled per packed token to the norm of
  the conditional prediction. guidance_scale = 1 trains CFG-free (one forward per step).
- latents: [B, C, h, w] at the sampler boundary (the pipeline's noise, drawn as [B, 1, C, h, w]);
  ``predict`` packs 2x2 patches [B, h/2 * w/2, 4C] and unpacks the velocity.
- schedule: linspace(1, 1/S, S) shifted by a mu that grows with the packed token count (the
  scheduler's config decides the shift type and terminal value); ``sigmas`` uses the configured size.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.finetune import TransformerWeights
from models.flux import check_folder, pack, shift_mu, unpack
from models.sd3 import _dtype, load_component

# Attention projections of every joint block (image and text streams). Adding the MLPs
# (img_mlp.net.0.proj, img_mlp.net.2, txt_mlp.net.0.proj, txt_mlp.net.2) gives a larger adapter.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
# Qwen-Image's prompt format: the system instruction it was trained with, and the number of leading
# template tokens (in Qwen2.5's tokenizer) whose hidden states are dropped.
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
TEMPLATE_TOKENS = 34
TOKENIZER_MAX_LENGTH = 1024  # prompt tokens the pipeline tokenizes (after the template's)


@dataclass
class QwenCond:
    """Encoded prompts and negative prompts: embeds [B, T, D] zero-padded, mask [B, T] (None: no padding)."""

    prompt_embeds: torch.Tensor
    mask: torch.Tensor | None
    neg_prompt_embeds: torch.Tensor
    neg_mask: torch.Tensor | None


def _pad(embeds: list[torch.Tensor], max_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[T_i, D] per prompt -> ([B, T, D] zero-padded to the longest and cut at max_len, [B, T] mask or None)."""
    t = max(e.shape[0] for e in embeds)
    out = torch.stack([torch.cat([e, e.new_zeros(t - e.shape[0], e.shape[1])]) for e in embeds])[:, :max_len]
    mask = torch.stack([(torch.arange(t) < e.shape[0]).long() for e in embeds])[:, :max_len]
    # The pipeline passes no mask when nothing is padded (attention then has no mask at all).
    return out, None if bool(mask.all()) else mask


class QwenImagePolicy:
    """Qwen-Image adapter (see module docstring).

    Args:
      path: local diffusers folder with model_index.json (QwenImagePipeline layout).
      finetune: "lora" | "full" (see models.finetune.TransformerWeights).
      lora_rank, lora_alpha, lora_targets: LoRA shape; targets are module-name suffixes.
      dtype: "auto" (bf16 on GPU, fp32 on CPU) | "float32" | "bfloat16" | "float16".
      gradient_checkpointing: recompute transformer activations in backward.
      max_sequence_length: prompt-embedding tokens kept (the pipeline's default 512).
      negative_prompt: the CFG negative prompt (the pipeline's examples use " ").
      height, width: image size in pixels (multiples of 16 for the 8x VAE); they also set the schedule's shift.
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
        negative_prompt: str = " ",
        height: int = 512,
        width: int = 512,
        needs_reference: bool = True,
        device: str | torch.device = "cpu",
    ):
        self.folder, index = check_folder(path, "Qwen-Image", "QwenImageTransformer2DModel",
                                          ("scheduler", "vae", "text_encoder", "tokenizer"))
        if finetune not in ("lora", "full"):
            raise ValueError(f"model.finetune must be 'lora' or 'full', got {finetune!r}")
        self.device = torch.device(device)
        self.dtype = _dtype(dtype, self.device)
        self.height, self.width = height, width
        self.max_sequence_length = max_sequence_length
        self.negative_prompt = negative_prompt
        load = lambda name: load_component(self.folder, name, index[name], self.dtype)  # noqa: E731
        self.scheduler, self.vae = load("scheduler"), load("vae")
        self.text_encoder, self.tokenizer = load("text_encoder"), load("tokenizer")
        transformer = load("transformer")
        self.vae_scale_factor = 2 ** len(self.vae.temperal_downsample)
        f = 2 * self.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"model.height/width ({height}x{width}) must be multiples of {f} "
                             f"(the VAE's {self.vae_scale_factor}x times the 2x2 packing)")
        for module in (self.vae, self.text_encoder):
            module.requires_grad_(False).eval().to(self.device)
        self.weights = TransformerWeights(transformer.to(self.device), finetune, lora_rank, lora_alpha, lora_targets,
                                          needs_reference, gradient_checkpointing)
        self.transformer = self.weights.transformer
        self._cache: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def _encode_one(self, prompt: str) -> torch.Tensor:
        """Qwen-Image's embedding of one prompt: [T, D], the template's leading tokens dropped."""
        tokens = self.tokenizer([PROMPT_TEMPLATE.format(prompt)], max_length=TOKENIZER_MAX_LENGTH + TEMPLATE_TOKENS,
                                padding=True, truncation=True, return_tensors="pt").to(self.device)
        hidden = self.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                   output_hidden_states=True).hidden_states[-1]
        return hidden[0][tokens.attention_mask[0].bool()][TEMPLATE_TOKENS:].to(self.text_encoder.dtype)

    def encode(self, prompts: list[str]) -> QwenCond:
        """Encode prompts and the negative prompt with a per-prompt cache (on the CPU).

        Each prompt is encoded alone (its embedding is the same in any batch); a batch is then padded
        to its longest prompt, so predictions match across batches up to float rounding only.
        """
        for p in {*prompts, self.negative_prompt}:
            if p not in self._cache:
                self._cache[p] = self._encode_one(p).cpu()
        embeds, mask = _pad([self._cache[p] for p in prompts], self.max_sequence_length)
        neg, neg_mask = _pad([self._cache[self.negative_prompt]] * len(prompts), self.max_sequence_length)
        move = lambda t: None if t is None else t.to(self.device)  # noqa: E731
        return QwenCond(move(embeds), move(mask), move(neg), move(neg_mask))

    # ------------------------------------------------------------- denoiser
    def _forward(self, tokens, sigma, embeds, mask, h, w):
        return self.weights.active()(
            hidden_states=tokens, timestep=sigma.float(), encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
            img_shapes=[[(1, h // 2, w // 2)]] * tokens.shape[0], return_dict=False,
        )[0]

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, cond: QwenCond, guidance_scale: float) -> torch.Tensor:
        """Velocity at (x, sigma) with the pipeline's true CFG when guidance_scale > 1.

        x [B, C, h, w]; sigma [B] in [0, 1] (the pipeline's timestep / 1000, kept in fp32). Returns
        [B, C, h, w] in the model dtype.
        """
        _, _, h, w = x.shape
        tokens = pack(x.to(self.dtype))
        out = self._forward(tokens, sigma, cond.prompt_embeds, cond.mask, h, w)
        if guidance_scale > 1.0:
            neg = self._forward(tokens, sigma, cond.neg_prompt_embeds, cond.neg_mask, h, w)
            mixed = neg + guidance_scale * (out - neg)
            # Rescaled per token to the conditional prediction's norm (over the packed channels).
            out = mixed * (torch.norm(out, dim=-1, keepdim=True) / torch.norm(mixed, dim=-1, keepdim=True))
        return unpack(out, h, w)

    def reference(self):
        """Within this context ``predict`` is the frozen reference policy (for the KL term)."""
        return self.weights.reference()

    # ---------------------------------------------------------- schedule/io
    def sigmas(self, num_steps: int) -> torch.Tensor:
        """[S+1] fp32 noise levels QwenImagePipeline uses for model.height x model.width images, ending at 0."""
        h, w = self.latent_shape(self.height, self.width)[1:]
        mu = shift_mu((h // 2) * (w // 2), self.scheduler.config)
        self.scheduler.set_timesteps(num_steps, sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
        return self.scheduler.sigmas.detach().float().cpu().clone()

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """(C, h, w): the VAE latent of one frame, h and w rounded down to even numbers as the pipeline does."""
        f = self.vae_scale_factor
        return (self.transformer.config.in_channels // 4, 2 * (height // (2 * f)), 2 * (width // (2 * f)))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> images [B, 3, H, W] fp32 in [0, 1] (the video VAE decodes one frame)."""
        cfg = self.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean).view(shape).to(latents.device, self.vae.dtype)
        std = torch.tensor(cfg.latents_std).view(shape).to(latents.device, self.vae.dtype)
        z = latents.to(self.vae.dtype).unsqueeze(2) * std + mean
        images = self.vae.decode(z, return_dict=False)[0][:, :, 0].float()
        return (images / 2 + 0.5).clamp(0, 1)

    # ----------------------------------------------------------- weights
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self.weights.trainable_state_dict()

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.weights.load_trainable_state_dict(state)

    def save_lora(self, out_dir: str | Path) -> Path:
        """A diffusers LoRA folder: ``QwenImagePipeline.from_pretrained(base).load_lora_weights(out_dir)``."""
        from diffusers import QwenImagePipeline

        return self.weights.save_lora(out_dir, QwenImagePipeline)

    def save_merged(self, out_dir: str | Path) -> Path:
        """A full diffusers folder with the trained transformer: ``QwenImagePipeline.from_pretrained(out_dir)``."""
        return self.weights.save_merged(out_dir, self.folder)
