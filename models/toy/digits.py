"""A handwritten-digits toy world: captions naming a digit, and real digits that satisfy them.

The images are scikit-learn's bundled UCI digits (`sklearn.datasets.load_digits`: 1797 grayscale
8x8 images, integer values 0..16, about 180 per digit), so the world needs no download. Prompts
are the ten captions "the digit zero" ... "the digit nine"; `rewards/digits.py` checks them with a
classifier fit on the train split.

Images are upsampled to `size` x `size` (default 16) by nearest neighbour (np.kron with a block of
ones) rather than by interpolation: every 8x8 pixel becomes an exact k x k block, so area-averaging
back to 8x8 (what the reward does) recovers the dataset image exactly, and a patch-2 model sees
(16 / 2)^2 = 64 tokens instead of 16.
"""

from __future__ import annotations

import numpy as np
import torch

WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SOURCE_SIZE = 8  # load_digits images are 8x8
SOURCE_MAX = 16.0  # load_digits pixel values are integers in 0..16
_PREFIX = "the digit "


def caption(digit: int) -> str:
    """"the digit <word>" for digit in 0..9; `parse_caption` inverts it exactly."""
    if not 0 <= digit < len(WORDS):
        raise ValueError(f"digit must be in 0..9, got {digit!r}")
    return f"{_PREFIX}{WORDS[digit]}"


def parse_caption(text: str) -> int:
    """Inverse of `caption`. Raises ValueError (naming `text`) for anything else."""
    word = text[len(_PREFIX):] if text.startswith(_PREFIX) else None
    if word not in WORDS:
        raise ValueError(f"caption outside the digits grammar: {text!r} (expected 'the digit <zero..nine>')")
    return WORDS.index(word)


def vocabulary() -> list[str]:
    """Every word that can appear in a caption, sorted."""
    return sorted({*_PREFIX.split(), *WORDS})


def split_indices(seed: int = 0, heldout_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/held-out split of load_digits' row indices, stratified by digit.

    Each digit holds out round(fraction * n) of its n images, at least 1 and at most n - 1. Both
    index arrays are sorted (dataset order).
    """
    from sklearn.datasets import load_digits  # deferred: only the digits world needs scikit-learn

    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    labels = load_digits().target
    rng = np.random.default_rng(seed)
    heldout = []
    for digit in range(len(WORDS)):
        ids = np.flatnonzero(labels == digit)
        n_out = min(max(round(heldout_fraction * len(ids)), 1), len(ids) - 1)
        heldout.append(rng.permutation(ids)[:n_out])
    heldout_ids = np.sort(np.concatenate(heldout))
    train_ids = np.setdiff1d(np.arange(len(labels)), heldout_ids)
    return train_ids, heldout_ids


def load_split(
    seed: int = 0, heldout_fraction: float = 0.2, size: int = 16
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_images, train_labels, heldout_images, heldout_labels) of the `split_indices` split.

    Images: float32 [N, size, size] in [0, 1] (the 0..16 values divided by 16), upsampled from 8x8
    by nearest neighbour (see the module docstring). Labels: int64 [N] digits 0..9. Raises
    ValueError unless size is a positive multiple of 8.
    """
    from sklearn.datasets import load_digits

    if size <= 0 or size % SOURCE_SIZE:
        raise ValueError(f"size must be a positive multiple of {SOURCE_SIZE}, got {size}")
    data = load_digits()
    block = np.ones((size // SOURCE_SIZE, size // SOURCE_SIZE), dtype=np.float32)
    # kron of [N, 8, 8] with [1, k, k] repeats each pixel into a k x k block.
    images = np.kron(data.images.astype(np.float32) / SOURCE_MAX, block[None])
    labels = data.target.astype(np.int64)
    train_ids, heldout_ids = split_indices(seed, heldout_fraction)
    return images[train_ids], labels[train_ids], images[heldout_ids], labels[heldout_ids]


def to_rgb_tensor(images: np.ndarray) -> torch.Tensor:
    """Grayscale images [N, H, W] in [0, 1] -> float32 [N, 3, H, W] in [-1, 1], the pixel-space target.

    White digit on black (0 -> -1, 1 -> 1), the gray value replicated to three channels so the
    digits fit the RGB pipeline that the VAE-free toy models and pixel rewards share.
    """
    if images.ndim != 3:
        raise ValueError(f"images must be [N, H, W], got shape {images.shape}")
    gray = torch.as_tensor(images, dtype=torch.float32) * 2 - 1
    return gray[:, None].expand(-1, 3, -1, -1).contiguous()
