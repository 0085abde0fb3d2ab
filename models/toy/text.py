"""A text-rendering toy world: captions quoting a short word, and images of that word drawn on a sign.

The images are rendered with Pillow's bundled font (`ImageFont.load_default(size=...)`), so the world
needs no font files and no download. Prompts are 'a sign that says "<word>"' for the twelve words in
WORDS; `rewards/ocr.py` reads the generated image back with OCR (RapidOCR, weights inside its wheel)
and scores the edit similarity to the quoted word, as text-rendering rewards do for SD3.5.

Rendering varies what a text prompt leaves open, ink colour (dark) and background (light); the word is
centred at a fixed 14 px. Measured on the 32-px, patch-4 toy: with a 1 px positional jitter, 1500 steps
of pre-training still drew unreadable glyphs (OCR similarity 0.02); centred, 500 further steps read 0.80.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WORDS: tuple[str, ...] = ("cat", "dog", "sun", "box", "map", "hat", "pen", "cup", "owl", "fox", "sky", "tea")
_PREFIX = 'a sign that says "'


def caption(word: str) -> str:
    """'a sign that says "<word>"' for a word in WORDS; `parse_caption` inverts it exactly."""
    if word not in WORDS:
        raise ValueError(f"word must be one of {WORDS}, got {word!r}")
    return f'{_PREFIX}{word}"'


def parse_caption(text: str) -> str:
    """Inverse of `caption`. Raises ValueError (naming `text`) for anything else."""
    word = text[len(_PREFIX):-1] if text.startswith(_PREFIX) and text.endswith('"') else None
    if word not in WORDS:
        raise ValueError(f'caption outside the text grammar: {text!r} (expected \'a sign that says "<word>"\' with a '
                         f"word in {WORDS})")
    return word


def vocabulary() -> list[str]:
    """Every token the toy's word-level tokenizer needs (its pre-tokenizer splits the quotes off), sorted."""
    return sorted({"a", "sign", "that", "says", '"', *WORDS})


def render(word: str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """uint8 [size, size, 3]: `word` centred, 14 px, in a dark ink on a light background (both colours
    drawn from ``rng``)."""
    ink = tuple(int(v) for v in rng.integers(0, 90, size=3))
    paper = tuple(int(v) for v in rng.integers(215, 256, size=3))
    font = ImageFont.load_default(size=14)
    image = Image.new("RGB", (size, size), paper)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    draw.text(((size - (right - left)) // 2 - left, (size - (bottom - top)) // 2 - top), word, fill=ink, font=font)
    return np.asarray(image)
