"""Text-rendering reward: read the image with OCR and compare it with the text the prompt quotes.

`OcrReward` runs RapidOCR (PP-OCRv4 detector + recogniser as ONNX models shipped inside the
`rapidocr-onnxruntime` wheel, so nothing is downloaded) on each image and scores
`edit_similarity(recognised, wanted)`, where `wanted` is the quoted text of the prompt
(`a sign that says "hello"` -> `hello`). Both strings are normalised first (Unicode NFKC, optional
case folding, whitespace handling), so the reward measures the characters drawn, not typography.
"""

from __future__ import annotations

import os
import re
import unicodedata
import warnings

import numpy as np
import torch

from rewards.grammar import unreadable

# Straight or curly double quotes around at least one character. Single quotes are left out on
# purpose: they collide with apostrophes ("a dog's sign that says 'hi'").
DEFAULT_PATTERN = r"[\"“]([^\"”]+)[\"”]"
WHITESPACE_MODES = ("remove", "collapse", "keep")


def levenshtein(a: str, b: str) -> int:
    """Edit distance between a and b: the fewest single-character insertions, deletions and
    substitutions turning one into the other (a transposition costs 2)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))  # distances from a[:0] to every prefix of b
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def edit_similarity(a: str, b: str) -> float:
    """1 - levenshtein(a, b) / max(len(a), len(b)), in [0, 1]; 1 iff a == b (two empty strings give 1)."""
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else 1.0 - levenshtein(a, b) / longest


class OcrReward:
    """reward = edit_similarity(OCR text of the image, quoted text of the prompt), in [0, 1].

    Text matching:
      pattern: regex finding the wanted text in a prompt, with at most one capturing group (the
        text; without a group, the whole match). Several matches are joined with a space
        (`"hello" and "world"` asks for "hello world"). A prompt with no match raises ValueError.
      casefold: compare case-insensitively. On by default because at the small sizes generators
        draw text, the recogniser often cannot tell c/C, o/O, s/S, x/X apart.
      whitespace: "remove" (default: PP-OCR drops or inserts the spaces between words, so they say
        nothing about how well the words were drawn), "collapse" (runs of whitespace become one
        space, ends stripped) or "keep".
    OCR engine (built lazily on the first call, once, so constructing the reward is cheap and a
    config can be validated without loading the models):
      det_limit_side_len, det_limit_type: the detector resizes the image so that its "min" (or
        "max") side is this many pixels. 320/"min" reads text in 32-96 px images at ~55-75 ms each on
        one core; RapidOCR's default 736 costs several times that for no gain at those sizes.
      use_angle_cls: run the 0/180 degree text-orientation classifier; off because generated text
        is upright and the classifier costs a third model call per text box.
      min_text_score: recognised boxes below this confidence are dropped (RapidOCR's text_score).
      intra_op_num_threads: onnxruntime threads per model. 1 by default: rewards run beside the
        policy and each other (see `rewards/ensemble.py`), and oversubscribed cores are far slower
        than one thread each.

    Components (float32 [B] on images.device): "reward" (the similarity) and "exact" (1 iff the
    normalised strings are equal).
    """

    input_kind = "pixels"
    differentiable = False

    def __init__(
        self,
        pattern: str = DEFAULT_PATTERN,
        casefold: bool = True,
        whitespace: str = "remove",
        det_limit_side_len: int = 320,
        det_limit_type: str = "min",
        use_angle_cls: bool = False,
        min_text_score: float = 0.5,
        intra_op_num_threads: int = 1,
    ) -> None:
        self.pattern = re.compile(pattern)
        if self.pattern.groups > 1:
            raise ValueError(f"pattern must have at most one capturing group (the text), got {self.pattern.groups}: {pattern!r}")
        if whitespace not in WHITESPACE_MODES:
            raise ValueError(f"whitespace must be one of {WHITESPACE_MODES}, got {whitespace!r}")
        if det_limit_type not in ("min", "max"):
            raise ValueError(f"det_limit_type must be 'min' or 'max', got {det_limit_type!r}")
        if not 0 <= min_text_score <= 1:
            raise ValueError(f"min_text_score must be in [0, 1], got {min_text_score}")
        if intra_op_num_threads < 1:
            raise ValueError(f"intra_op_num_threads must be >= 1, got {intra_op_num_threads}")
        cores = os.cpu_count() or 1
        if intra_op_num_threads > cores:
            # RapidOCR silently falls back to onnxruntime's default (all cores) above the core count.
            warnings.warn(
                f"OcrReward: intra_op_num_threads={intra_op_num_threads} exceeds the {cores} cores here; RapidOCR "
                f"ignores it and onnxruntime uses all cores",
                stacklevel=2,
            )
        self.casefold = bool(casefold)
        self.whitespace = whitespace
        self.use_angle_cls = bool(use_angle_cls)
        self._engine_kwargs = dict(
            det_limit_side_len=int(det_limit_side_len),
            det_limit_type=det_limit_type,
            use_cls=self.use_angle_cls,
            text_score=float(min_text_score),
            intra_op_num_threads=int(intra_op_num_threads),
            # Models run one after another, so a second inter-op thread would only idle or contend.
            inter_op_num_threads=1,
        )
        self._engine = None

    @property
    def engine(self):
        """The RapidOCR engine, built on first use (~0.2 s: three ONNX sessions)."""
        if self._engine is None:
            try:  # deferred: only this reward needs onnxruntime
                from rapidocr_onnxruntime import RapidOCR
            except ImportError as e:
                raise ImportError(
                    "OcrReward needs rapidocr-onnxruntime, installed without its dependencies (they include the "
                    "non-headless opencv-python, which would clash with opencv-python-headless): "
                    "pip install --no-deps rapidocr-onnxruntime==1.4.4"
                ) from e
            self._engine = RapidOCR(**self._engine_kwargs)
        return self._engine

    def normalize(self, text: str) -> str:
        """`text` as compared: NFKC (the recogniser's Chinese-trained vocabulary emits full-width
        forms such as "，" and "Ａ"), then case folding and whitespace handling as configured."""
        text = unicodedata.normalize("NFKC", text)
        if self.casefold:
            text = text.casefold()
        if self.whitespace == "remove":
            text = "".join(text.split())
        elif self.whitespace == "collapse":
            text = " ".join(text.split())
        return text

    def wanted_text(self, prompt: str) -> str:
        """The normalised text `prompt` asks to be drawn. Raises ValueError, naming the prompt, when
        `pattern` finds nothing or only whitespace."""
        found = self.pattern.findall(prompt)
        text = self.normalize(" ".join(found))
        if not text:
            raise ValueError(
                f"prompt {prompt!r} asks for no text: OcrReward needs the text to render quoted, matching "
                f"{self.pattern.pattern!r} (e.g. 'a sign that says \"hello\"')"
            )
        return text

    def check_prompts(self, prompts: list[str]) -> None:
        """Raise ValueError, before any image is drawn, when some of `prompts` quote no text: an OCR reward
        on them would fail at the first batch (or, with a looser pattern, train on nothing)."""
        missing = unreadable(prompts, self.wanted_text)
        if missing:
            how = "in double quotes" if self.pattern.pattern == DEFAULT_PATTERN else f"matching {self.pattern.pattern!r}"
            raise ValueError(
                f"{len(missing)} of {len(prompts)} prompts quote no text to draw (first: {missing[0]!r}); OCR scores "
                f"the text a prompt quotes {how} (e.g. 'a sign that says \"cat\"'). On "
                f"the toys, the text toy is trained with OCR: python -m launch.train experiment=toy_text; otherwise "
                f"point data.prompts at prompts that quote their text"
            )

    def read(self, image: np.ndarray) -> str:
        """Raw recognised text of one uint8 [H, W, 3] RGB image: every box above min_text_score, in
        RapidOCR's reading order (top to bottom, then left to right), joined by spaces; "" if none."""
        # RapidOCR takes arrays in OpenCV's BGR order; the copy makes the flipped view contiguous.
        result, _ = self.engine(np.ascontiguousarray(image[:, :, ::-1]), use_cls=self.use_angle_cls)
        return " ".join(box[1] for box in result) if result else ""

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata=None) -> dict[str, torch.Tensor]:
        """Score images [B, 3, H, W] (float in [0, 1]) against `prompts` (B strings quoting the text).

        Returns float32 [B] tensors on images.device: "reward" (edit similarity in [0, 1]) and
        "exact" (0 or 1). `metadata` is ignored. Raises ValueError on a shape or length mismatch
        and for a prompt without quoted text (checked before any OCR runs).
        """
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be float [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images")
        wanted = [self.wanted_text(p) for p in prompts]  # fail fast, before the slow part
        # Clamp because decoders overshoot [0, 1] slightly; uint8 is what the OCR models were trained on.
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
        similarity, exact = [], []
        for image, target in zip(pixels, wanted):
            seen = self.normalize(self.read(image))
            similarity.append(edit_similarity(seen, target))
            exact.append(float(seen == target))
        return {
            "reward": torch.tensor(similarity, dtype=torch.float32, device=images.device),
            "exact": torch.tensor(exact, dtype=torch.float32, device=images.device),
        }
