"""Prompt tables and which prompts each step draws."""
from __future__ import annotations

from pathlib import Path

import torch

from trainer.errors import UserError
from trainer.rng import STREAM_PROMPTS, generator


class PromptsError(UserError, ValueError):
    """A prompts file that cannot be used; the message names the key, the file and the fix."""


DEFAULT_MAX_PROMPT_CHARS = 2000  # data.max_prompt_chars's default (trainer/config.py)
_SHOWN = 60  # characters of a prompt quoted in an error (a 100k-character line is never echoed whole)


def shorten(text: str, keep: int = _SHOWN) -> str:
    """``text`` quoted for an error message: whole if short, else its start and its length."""
    return repr(text) if len(text) <= keep else f"{text[:keep]!r}... ({len(text)} characters)"


def load_prompts(path: str, key: str = "data.prompts", max_chars: int = DEFAULT_MAX_PROMPT_CHARS) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file (a UTF-8 byte-order mark is allowed).

    Raises PromptsError (a UserError) naming ``key`` and the file when it is missing, not a file,
    unreadable, binary, not UTF-8, empty, or has a prompt longer than ``max_chars`` characters (text
    encoders truncate long prompts silently: 77 tokens for CLIP, a few hundred for T5).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        what = "is a folder" if file.is_dir() else "no such file"
        raise PromptsError(f"{key}={path!r}: {what}; give a text file with one prompt per line")
    try:
        raw = file.read_bytes()
    except OSError as e:
        raise PromptsError(f"{key}={path!r} cannot be read ({e.strerror or e}); check its permissions") from e
    if b"\0" in raw[:1 << 16]:
        raise PromptsError(f"{key}={path!r} is a binary file (it holds NUL bytes), not a text file with one prompt "
                           "per line")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise PromptsError(f"{key}={path!r} is not UTF-8 text (byte {raw[e.start]:#04x} at line {line}); save it as "
                           "UTF-8 (e.g. iconv -f latin1 -t utf-8)") from e
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if len(line) > max_chars:
            raise PromptsError(f"{key}={path!r} line {number} has {len(line)} characters, more than "
                               f"data.max_prompt_chars={max_chars}: {shorten(line)}; shorten it, or raise "
                               "data.max_prompt_chars if your text encoder reads that much")
        prompts.append(line)
    if not prompts:
        raise PromptsError(f"{key}={path!r} holds no prompts (it is empty or only blank lines)")
    return prompts


def step_prompt_ids(num_prompts: int, per_step: int, step: int, seed: int) -> torch.Tensor:
    """The ``per_step`` distinct prompt ids of training step ``step`` (a pure function of its arguments).

    Distinct ids within a step keep (step, prompt id, sample index) unique, which the noise seeds rely on.
    """
    if per_step > num_prompts:
        raise ValueError(f"data.prompts_per_step ({per_step}) exceeds the {num_prompts} prompts available")
    return torch.randperm(num_prompts, generator=generator(seed, STREAM_PROMPTS, step))[:per_step]
