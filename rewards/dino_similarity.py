"""DINOv2 similarity to reference images: "the image as its own reward" (Adv-GRPO).

Adv-GRPO (2025, "The Image as Its Own Reward: Reinforcement Learning with Adversarial Reward for Image
Generation") rewards generations by how close their DINO features are to reference images rather
than by a learned preference score, which is harder to hack with saturated colour or text-like
texture. This is the frozen form of that reward: the cosine between DINOv2 features of the generated
image and of its reference images (the paper additionally fine-tunes the feature extractor
adversarially; that belongs in a trainer extension, not in a reward).

References come from a folder (every image in it, the same set for every sample) and/or per sample
from metadata[i][metadata_key] (a path or a list of paths), which takes precedence for that sample.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rewards.clip_score import grad_context
from rewards.image_preprocess import ImagePreprocess
from rewards.local_weights import require_folder, resolve_device, resolve_dtype

FETCH_DINO = "e.g. `hf download facebook/dinov2-base --local-dir /models/dinov2-base`"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
POOLINGS = ("cls", "mean")
REDUCTIONS = ("mean", "max")


def load_image(path) -> torch.Tensor:
    """An image file as float32 [1, 3, H, W] in [0, 1] (RGB; alpha and palettes dropped)."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


class DinoSimilarity:
    """reward = reduce over references r of cos(DINOv2 features(image), DINOv2 features(r)), in [-1, 1].

    path: local folder of a transformers Dinov2Model (config.json, weights, preprocessor_config.json).
    references: folder of reference images (IMAGE_SUFFIXES), used for every sample without per-sample
      references; None: every sample must carry its own.
    metadata_key: per-sample references in metadata[i][metadata_key]: a path or a list of paths.
    pooling: "cls" (the final-layer-normed CLS token, DINOv2's image embedding) or "mean" (mean of
      the patch tokens: more sensitive to layout than to identity).
    reduce: "mean" (closeness to the reference set) or "max" (to the nearest reference).
    processor_path, device, dtype, batch_size: as in rewards.clip_score.ClipScore.

    Reference features are computed once per path and kept for the life of the reward (one D-dim
    vector each). __call__ returns a float32 [B] tensor on images.device; differentiable in the pixels
    when the images require grad, otherwise under no_grad.
    """

    input_kind = "pixels"
    differentiable = True

    def __init__(self, path: str, references: str | None = None, metadata_key: str = "reference", pooling: str = "cls",
                 reduce: str = "mean", processor_path: str | None = None, device: str = "auto", dtype: str = "float32",
                 batch_size: int = 32) -> None:
        from transformers import Dinov2Model

        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        owner = type(self).__name__
        folder = require_folder(path, owner, "path", FETCH_DINO)
        processor_folder = folder if processor_path is None else require_folder(processor_path, owner, "processor_path", FETCH_DINO)
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.model = Dinov2Model.from_pretrained(folder, local_files_only=True).requires_grad_(False).eval()
        self.model.to(device=self.device, dtype=self.dtype)
        self.preprocess = ImagePreprocess.from_folder(processor_folder)
        self.pooling, self.reduce, self.metadata_key, self.batch_size = pooling, reduce, metadata_key, int(batch_size)
        self._cache: dict[str, torch.Tensor] = {}  # reference path -> unit-norm feature [D]
        self.default_references: list[str] = []
        if references is not None:
            ref_folder = require_folder(references, owner, "references", "a folder of reference images")
            self.default_references = sorted(str(p) for p in ref_folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not self.default_references:
                raise FileNotFoundError(f"{owner}: references={references!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            self.reference_features(self.default_references)  # fail on unreadable files now, not mid-run

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm features [B, D] float32 on self.device of images [B, 3, H, W] in [0, 1]."""
        out = []
        for chunk in images.split(self.batch_size):
            hidden = self.model(pixel_values=self.preprocess(chunk.to(self.device)).to(self.dtype)).last_hidden_state
            # Dinov2Model's last_hidden_state is already final-layer-normed; token 0 is CLS (pooler_output).
            pooled = hidden[:, 0] if self.pooling == "cls" else hidden[:, 1:].mean(dim=1)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def reference_features(self, paths: list[str]) -> torch.Tensor:
        """Unit-norm features [len(paths), D] of reference image files, cached by path."""
        for p in paths:
            if p not in self._cache:
                if not Path(p).is_file():
                    raise FileNotFoundError(f"{type(self).__name__}: reference image {p!r} does not exist")
                self._cache[p] = self.features(load_image(p))[0]
        return torch.stack([self._cache[p] for p in paths])

    def references_for(self, metadata: list[dict] | None, batch: int) -> list[list[str]]:
        """Per sample, the reference paths: metadata's when present, else the folder's."""
        rows = metadata if metadata is not None else [{}] * batch
        if len(rows) != batch:
            raise ValueError(f"got {len(rows)} metadata entries for {batch} images")
        out = []
        for i, row in enumerate(rows):
            refs = (row or {}).get(self.metadata_key)
            refs = [refs] if isinstance(refs, (str, Path)) else refs
            refs = [str(r) for r in refs] if refs else self.default_references
            if not refs:
                raise ValueError(
                    f"sample {i} has no reference images: give metadata[i][{self.metadata_key!r}] (a path or list of "
                    f"paths) or set the reward's references=<folder>"
                )
            out.append(refs)
        return out

    def __call__(self, images: torch.Tensor, prompts: list[str] | None = None, metadata: list[dict] | None = None) -> torch.Tensor:
        """Score images [B, 3, H, W] (float in [0, 1]) -> float32 [B] on images.device; prompts are ignored."""
        references = self.references_for(metadata, images.shape[0])  # before the forward: fail fast
        with grad_context(images):
            generated = self.features(images)
            scores = []
            for feature, refs in zip(generated, references):
                cosine = self.reference_features(refs) @ feature
                scores.append(cosine.mean() if self.reduce == "mean" else cosine.max())
            return torch.stack(scores).to(images.device)
