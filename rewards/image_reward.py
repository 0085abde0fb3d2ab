"""ImageReward (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image
Generation"): a BLIP text encoder reads the prompt while cross-attending to the image's ViT tokens;
an MLP on its [CLS] state gives the preference score, standardised with the training set's mean/std.

Loads the folders written by `python -m rewards.image_reward_convert` (the checkpoint ships in BLIP's
own layout). Preprocessing runs in torch, so the score is differentiable in the pixels: the ReFL
algorithm of the same paper backpropagates through it.
"""

from __future__ import annotations

import torch

from rewards.aesthetic import aesthetic_head
from rewards.clip_score import grad_context
from rewards.image_preprocess import ImagePreprocess
from rewards.local_weights import load_state_dict, require_folder, resolve_device, resolve_dtype

FETCH = ("`hf download THUDM/ImageReward ImageReward.pt --local-dir /models` and `hf download google-bert/bert-base-uncased "
         "--local-dir /models/bert-base-uncased`, then `python -m rewards.image_reward_convert /models/ImageReward.pt "
         "--tokenizer /models/bert-base-uncased --out /models/ImageReward-v1.0`")
# ImageReward.py's standardisation constants (the raw MLP output's mean and std on its training data).
MEAN, STD = 0.16717362830052426, 1.0333394966054072


class ImageRewardScore:
    """reward = (MLP(BLIP text encoder([CLS] prompt [SEP] x image tokens)[CLS]) - mean) / std, ~N(0, 1).

    path: folder written by rewards.image_reward_convert (vision/, text/, head.safetensors, tokenizer,
      preprocessor_config.json).
    max_tokens: prompts are truncated to this many tokens, [CLS] and [SEP] included (ImageReward: 35).
    mean, std: the standardisation (ImageReward's published constants by default).
    device, dtype, batch_size: as in rewards.clip_score.ClipScore.

    Returns a float32 [B] tensor on images.device. Differentiable in the pixels when the images
    require grad; otherwise runs under no_grad.
    """

    input_kind = "pixels"
    differentiable = True

    def __init__(self, path: str, max_tokens: int = 35, mean: float = MEAN, std: float = STD, device: str = "auto",
                 dtype: str = "float32", batch_size: int = 32) -> None:
        from transformers import AutoTokenizer, BlipTextModel, BlipVisionModel

        if batch_size < 1 or max_tokens < 2 or std <= 0:
            raise ValueError(f"need batch_size >= 1 ({batch_size}), max_tokens >= 2 ({max_tokens}), std > 0 ({std})")
        folder = require_folder(path, type(self).__name__, "path", FETCH)
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.vision = BlipVisionModel.from_pretrained(folder / "vision", local_files_only=True)
        # add_pooling_layer=False: ImageReward reads the [CLS] state itself; a pooler would load random.
        self.text = BlipTextModel.from_pretrained(folder / "text", local_files_only=True, add_pooling_layer=False)
        for model in (self.vision, self.text):
            model.requires_grad_(False).eval().to(device=self.device, dtype=self.dtype)
        self.head = aesthetic_head(load_state_dict(folder / "head.safetensors")).to(self.device).requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.preprocess = ImagePreprocess.from_folder(folder)
        self.max_tokens, self.mean, self.std, self.batch_size = int(max_tokens), float(mean), float(std), int(batch_size)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata=None) -> torch.Tensor:
        """Score images [B, 3, H, W] (float in [0, 1]) against B prompts -> float32 [B] on images.device."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images")
        out = []
        with grad_context(images):
            for start in range(0, len(prompts), self.batch_size):
                chunk = images[start : start + self.batch_size].to(self.device)
                tokens = self.tokenizer(prompts[start : start + self.batch_size], padding=True, truncation=True,
                                        max_length=self.max_tokens, return_tensors="pt").to(self.device)
                image_tokens = self.vision(pixel_values=self.preprocess(chunk).to(self.dtype)).last_hidden_state
                # Bidirectional (is_decoder=False) over the prompt, cross-attending to every image token;
                # padding is masked, so it does not matter that ImageReward padded to 35 and this pads less.
                state = self.text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                  encoder_hidden_states=image_tokens).last_hidden_state[:, 0]
                out.append((self.head(state.float()).squeeze(-1) - self.mean) / self.std)
        return torch.cat(out).to(images.device)
