"""CLIP image-text similarity rewards: CLIPScore, PickScore and HPS v2, from local transformers folders.

All three are one computation, cos(image embedding, text embedding) of a CLIP model, scaled:
  - CLIPScore (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image
    Captioning"): w * max(cos, 0) with w = 2.5, on OpenAI CLIP ViT-L/14 (or any CLIP).
  - PickScore (Kirstain et al. 2023, "Pick-a-Pic"): logit_scale.exp() * cos (~100 * cos) on
    yuvalkirstain/PickScore_v1, a CLIP-H/14 fine-tuned on human preferences.
  - HPS v2 / v2.1 (Wu et al. 2023, "Human Preference Score v2"): the plain cosine on a CLIP-H/14
    fine-tune (xswu/HPSv2 ships an open_clip checkpoint: convert it once with
    `python -m rewards.open_clip_convert`, see that module).
Image preprocessing runs in torch (rewards/image_preprocess.py), so the reward is differentiable in
the pixels: reward-backprop algorithms can use it.
"""

from __future__ import annotations

import torch

from rewards.image_preprocess import ImagePreprocess
from rewards.local_weights import require_folder, resolve_device, resolve_dtype

FETCH_CLIP = "e.g. `hf download openai/clip-vit-large-patch14 --local-dir /models/clip-vit-large-patch14`"


def load_clip(path, processor_path, owner: str, fetch: str = FETCH_CLIP):
    """(CLIPModel in eval mode, frozen, float32 on the CPU; ImagePreprocess; processor folder) from
    local folders. `path` holds config.json + weights; `processor_path` (default: `path`) holds
    preprocessor_config.json and the tokenizer files. FileNotFoundError naming the key when either
    folder is missing."""
    from transformers import CLIPModel

    folder = require_folder(path, owner, "path", fetch)
    processor_folder = folder if processor_path is None else require_folder(processor_path, owner, "processor_path", fetch)
    # local_files_only: a folder path never reaches the hub anyway; this makes a typo an error, not a download.
    model = CLIPModel.from_pretrained(folder, local_files_only=True)
    model.requires_grad_(False).eval()
    return model, ImagePreprocess.from_folder(processor_folder), processor_folder


def grad_context(images: torch.Tensor):
    """Record the graph only when the caller asks for gradients (images that require grad, outside
    no_grad); otherwise no_grad, so plain scoring keeps no activations."""
    return torch.set_grad_enabled(torch.is_grad_enabled() and images.requires_grad)


def embed_images(model, preprocess: ImagePreprocess, images: torch.Tensor, batch_size: int, device, dtype) -> torch.Tensor:
    """Unit-norm CLIP image embeddings [B, D] float32 (on device) of images [B, 3, H, W] in [0, 1],
    `batch_size` images per forward; differentiable in `images` under grad_context."""
    out = []
    for chunk in images.split(batch_size):
        pixels = preprocess(chunk.to(device)).to(dtype)
        # vision_model + visual_projection rather than get_image_features: the latter returns a tensor
        # in transformers 4 and a ModelOutput in 5.
        embeds = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        # Normalised in float32: bf16 norms of 768-1024-dim vectors lose ~3 digits.
        out.append(torch.nn.functional.normalize(embeds.float(), dim=-1))
    return torch.cat(out)


class ClipScore:
    """reward = scale * cos(CLIP image embedding, CLIP text embedding), optionally clamped at 0.

    path: local folder of a transformers CLIP model (config.json + weights).
    processor_path: folder with preprocessor_config.json and the tokenizer, when `path` lacks them
      (PickScore_v1 ships neither: use the CLIP-H folder it was fine-tuned from). Default: path.
    scale: a number (CLIPScore: 2.5, HPS v2: 1.0) or "logit_scale" for the checkpoint's learned
      temperature exp(logit_scale) (PickScore), read in float32 before any dtype cast.
    clamp_negative: max(cos, 0) before scaling, as CLIPScore defines it.
    device: "auto" (this rank's GPU if any, else CPU), "cpu", "cuda", "cuda:N".
    dtype: "float32", "bfloat16" or "float16" for the model weights and activations.
    batch_size: images (and distinct prompts) per forward pass.

    __call__ returns float32 [B] tensors on images.device: "reward" and "cosine" (unscaled, unclamped).
    Differentiable in the pixels when the images require grad; otherwise runs under no_grad.
    """

    input_kind = "pixels"
    differentiable = True

    def __init__(self, path: str, scale: float | str = 2.5, clamp_negative: bool = True, processor_path: str | None = None,
                 device: str = "auto", dtype: str = "float32", batch_size: int = 32) -> None:
        if isinstance(scale, str) and scale != "logit_scale":
            raise ValueError(f"scale must be a number or 'logit_scale', got {scale!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        from transformers import AutoTokenizer

        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        model, self.preprocess, processor_folder = load_clip(path, processor_path, type(self).__name__)
        self.scale = float(model.logit_scale.exp()) if scale == "logit_scale" else float(scale)
        self.model = model.to(device=self.device, dtype=self.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(processor_folder, local_files_only=True)
        # CLIP's position table is the text length limit (77); longer prompts are truncated, as in every
        # reference implementation.
        self.max_tokens = self.model.config.text_config.max_position_embeddings
        self.clamp_negative = bool(clamp_negative)
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings [N, D] float32 on self.device, one per prompt."""
        out = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(
                prompts[start : start + self.batch_size], padding=True, truncation=True, max_length=self.max_tokens,
                return_tensors="pt",
            ).to(self.device)
            pooled = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
            out.append(torch.nn.functional.normalize(self.model.text_projection(pooled).float(), dim=-1))
        return torch.cat(out)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata=None) -> dict[str, torch.Tensor]:
        """Score images [B, 3, H, W] (float in [0, 1]) against B prompts; metadata is ignored."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images")
        # A GRPO batch holds each prompt group_size times: embed each distinct prompt once.
        row = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        text = self.embed_texts(list(row))[torch.tensor([row[p] for p in prompts], device=self.device)]
        with grad_context(images):
            image = embed_images(self.model, self.preprocess, images, self.batch_size, self.device, self.dtype)
            cosine = (image * text).sum(dim=-1)
            reward = self.scale * (cosine.clamp_min(0) if self.clamp_negative else cosine)
        return {"reward": reward.to(images.device), "cosine": cosine.to(images.device)}
