"""Rewards from a local transformers VLM (no server): a yes/no judge, a pairwise judge and PromptEcho.

- `VlmYesNoJudge` (RewardDance, Wu et al. 2025, "RewardDance: Reward Scaling in Visual Generation"):
  reward = P(yes) / (P(yes) + P(no)) of the VLM's next token after a question about the image, or
  about the image beside a reference image. The in-process twin of rewards/vlm_judge.py's OpenAIJudge.
- `PromptEcho` (2026, "PromptEcho: Annotation-Free Reward from Vision-Language Models for Text-to-Image
  Reinforcement Learning"): reward = the teacher-forced log-likelihood of the prompt as the VLM's
  answer to a fixed query ("Describe this image in detail.") about the image.
- `VlmPairwisePreference` (Pref-GRPO's pairwise judge): P(image a beats image b), both orders asked,
  as the judge of rewards/winrate.py's WinRate.

Both load any `AutoModelForImageTextToText` + `AutoProcessor` folder (LLaVA, Qwen2-VL / Qwen2.5-VL,
...) and build their inputs with the processor's own chat template, so a model is a config change.
Neither is differentiable: the processors take 8-bit images.
"""

from __future__ import annotations

import torch
from PIL import Image

from rewards.dino_similarity import load_image
from rewards.local_weights import require_folder, resolve_device, resolve_dtype
from rewards.protocol import quantize
from rewards.vlm_judge import DEFAULT_QUESTION, normalise_token

FETCH_VLM = "e.g. `hf download Qwen/Qwen2.5-VL-7B-Instruct --local-dir /models/Qwen2.5-VL-7B-Instruct`"
DEFAULT_QUERY = "Describe this image in detail."
DEFAULT_PAIR_QUESTION = 'Which image shows "{prompt}" better, the first or the second? Answer 1 or 2.'


class LocalVlm:
    """A VLM and its processor from a local folder, frozen, with chat-formatted batched inputs.

    The tokenizer pads on the left, so every row's last position is its last real token (the judge
    reads the next-token distribution there; PromptEcho's answer tokens end there). Left padding does
    not change the real tokens' results: RoPE depends on position differences only, and padding is masked.
    """

    def __init__(self, path: str, device: str, dtype: str, owner: str) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        folder = require_folder(path, owner, "path", FETCH_VLM)
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        self.processor.tokenizer.padding_side = "left"
        # Loaded straight into dtype: a 7B model in float32 first would need 28 GB.
        self.model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, dtype=self.dtype)
        self.model.requires_grad_(False).eval().to(self.device)
        self.tokenizer = self.processor.tokenizer

    def prompt_text(self, text: str, n_images: int, system_prompt: str | None) -> str:
        """The chat-template rendering of one user turn (n_images images, then `text`), ending with the
        assistant's turn opened (add_generation_prompt)."""
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
        messages = ([{"role": "system", "content": [{"type": "text", "text": system_prompt}]}] if system_prompt else []) + [
            {"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def inputs(self, texts: list[str], images: list[Image.Image]):
        """Processor inputs on the model's device, left-padded; `images` in the order their placeholders
        appear across `texts`."""
        batch = self.processor(text=texts, images=images, padding=True, return_tensors="pt").to(self.device)
        if "pixel_values" in batch:  # the vision tower runs in the model's dtype
            batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        return batch


def pil_images(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] floats in [0, 1] -> B RGB PIL images (rounded to 8 bits: what the processors take)."""
    return [Image.fromarray(a) for a in quantize(images)]


def word_ids(vlm: LocalVlm, words, owner: str) -> torch.Tensor:
    """Ids [K] of every vocabulary token that normalises to one of `words`; ValueError if none."""
    wanted = {normalise_token(w) for w in words}
    tokens = vlm.tokenizer.convert_ids_to_tokens(list(range(len(vlm.tokenizer))))
    ids = [i for i, t in enumerate(tokens) if t is not None and normalise_token(t) in wanted]
    if not ids:
        raise ValueError(f"{owner}: no token of the tokenizer in {vlm.tokenizer.name_or_path!r} reads as {sorted(wanted)}")
    return torch.tensor(ids, device=vlm.device)


def check_batch(images: torch.Tensor, prompts: list[str], batch_size: int) -> None:
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


class VlmYesNoJudge:
    """reward = P(yes) / (P(yes) + P(no)) in [0, 1] for the next token after `question` about the image.

    path: local folder of a transformers image-text-to-text model with its processor (and chat template).
    question: template with {prompt}. system_prompt: optional system turn.
    yes_words, no_words: words whose every vocabulary token counts (after rewards.vlm_judge's
      normalise_token: "Yes", " yes", "YES" ... all count as "yes").
    reference_key: when set, metadata[i][reference_key] is the path of a reference image shown after the
      generated one (RewardDance's comparative form: write the question accordingly, e.g. "Is the first
      image better than the second at showing {prompt}?").
    device, dtype ("bfloat16" by default: VLM judges are billions of parameters), batch_size.

    Returns float32 [B] tensors on images.device: "reward" and "yes_no_mass" (P(yes) + P(no): low means
    the question is not getting a yes/no answer).
    """

    input_kind = "pixels"
    differentiable = False

    def __init__(self, path: str, question: str = DEFAULT_QUESTION, system_prompt: str | None = None,
                 yes_words: tuple[str, ...] = ("yes",), no_words: tuple[str, ...] = ("no",), reference_key: str | None = None,
                 device: str = "auto", dtype: str = "bfloat16", batch_size: int = 8) -> None:
        try:  # a stray placeholder fails at construction, not mid-run
            question.format(prompt="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"question may only use the placeholder {{prompt}} (write {{{{ }}}} for literal braces): {question!r}") from e
        words = [*yes_words, *no_words]
        if not all(isinstance(w, str) for w in words):  # YAML 1.1 reads bare yes/no as booleans
            raise ValueError(f"yes_words and no_words must be strings (quote them in YAML), got {words}")
        self.vlm = LocalVlm(path, device, dtype, type(self).__name__)
        self.question, self.system_prompt, self.reference_key = question, system_prompt, reference_key
        self.batch_size = int(batch_size)
        self.yes_ids, self.no_ids = self.word_ids(yes_words), self.word_ids(no_words)

    def word_ids(self, words) -> torch.Tensor:
        return word_ids(self.vlm, words, type(self).__name__)

    def images_for(self, images: list[Image.Image], metadata: list[dict] | None) -> tuple[list[Image.Image], int]:
        """(images in placeholder order, images per sample): with a reference, generated then reference."""
        if self.reference_key is None:
            return images, 1
        if metadata is None or len(metadata) != len(images) or any(self.reference_key not in (m or {}) for m in metadata):
            raise ValueError(f"{type(self).__name__}: reference_key={self.reference_key!r} needs metadata[i][{self.reference_key!r}] "
                             f"(an image path) for every one of the {len(images)} samples")
        out = []
        for image, row in zip(images, metadata):
            out += [image, pil_images(load_image(row[self.reference_key]))[0]]
        return out, 2

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> dict[str, torch.Tensor]:
        """Score images [B, 3, H, W] (float in [0, 1]) against B prompts."""
        check_batch(images, prompts, self.batch_size)
        flat, per_sample = self.images_for(pil_images(images), metadata)
        rewards, masses = [], []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            texts = [self.vlm.prompt_text(self.question.format(prompt=p), per_sample, self.system_prompt) for p in chunk]
            batch = self.vlm.inputs(texts, flat[start * per_sample : (start + len(chunk)) * per_sample])
            # logits_to_keep=1: only the last position's logits, not [T, vocab] for every image token.
            probs = self.vlm.model(**batch, logits_to_keep=1).logits[:, -1].float().softmax(dim=-1)
            p_yes, p_no = probs[:, self.yes_ids].sum(dim=-1), probs[:, self.no_ids].sum(dim=-1)
            rewards.append(p_yes / (p_yes + p_no))
            masses.append(p_yes + p_no)
        return {"reward": torch.cat(rewards).to(images.device), "yes_no_mass": torch.cat(masses).to(images.device)}


class PromptEcho:
    """reward = log P(prompt | image, query) per prompt token ("mean") or in total ("sum"), teacher-forced.

    The VLM sees the image and `query` as the user turn; the prompt is scored as the start of the
    assistant's answer, token by token (no end-of-turn token: a prompt is a description, not
    necessarily all of one). "mean" is minus the usual token-level cross-entropy and comparable across
    prompts of different lengths; "sum" is the paper's total log-likelihood. Within a GRPO group
    (one prompt) the two differ by a constant factor, which group normalisation removes.

    path, system_prompt, device, dtype, batch_size: as in VlmYesNoJudge.
    Returns float32 [B] tensors on images.device: "reward", "logprob_mean", "logprob_sum", "prompt_tokens".
    Raises ValueError when the chat template's tokenization of query + prompt does not start with that
    of the query alone (the answer's tokens could then not be told apart).
    """

    input_kind = "pixels"
    differentiable = False

    def __init__(self, path: str, query: str = DEFAULT_QUERY, system_prompt: str | None = None, reduction: str = "mean",
                 device: str = "auto", dtype: str = "bfloat16", batch_size: int = 8) -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.vlm = LocalVlm(path, device, dtype, type(self).__name__)
        self.query, self.system_prompt, self.reduction, self.batch_size = query, system_prompt, reduction, int(batch_size)

    def score(self, images: list[Image.Image], prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of log-probs [b], token counts [b]) of each prompt as the answer, one forward pass."""
        prefix = self.vlm.prompt_text(self.query, 1, self.system_prompt)
        asked = self.vlm.inputs([prefix] * len(prompts), images)
        full = self.vlm.inputs([prefix + p for p in prompts], images)
        prefix_len, full_len = asked["attention_mask"].sum(dim=1), full["attention_mask"].sum(dim=1)
        width_a, width_f = asked["input_ids"].shape[1], full["input_ids"].shape[1]
        for i in range(len(prompts)):  # left padding: row i's real tokens are its last *_len
            head = full["input_ids"][i, width_f - full_len[i] :][: prefix_len[i]]
            if not torch.equal(head, asked["input_ids"][i, width_a - prefix_len[i] :]):
                raise ValueError(f"{type(self).__name__}: the tokens of query + prompt {prompts[i]!r} do not start with the "
                                 f"tokens of the query alone; the chat template merges them across the boundary")
        n = full_len - prefix_len  # answer tokens per row, the last n of each row
        if (n < 1).any():
            raise ValueError(f"{type(self).__name__}: empty prompt among {prompts}")
        keep = int(n.max()) + 1  # logits at positions T-n-1 .. T-2 predict the last n tokens
        logits = self.vlm.model(**full, logits_to_keep=keep).logits[:, :-1].float()  # [b, keep-1, V]
        targets = full["input_ids"][:, width_f - keep + 1 :]  # [b, keep-1]
        logprobs = logits.log_softmax(dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        position = torch.arange(keep - 1, device=n.device)
        answer = position >= (keep - 1 - n).unsqueeze(1)  # the last n positions of each row
        return (logprobs * answer).sum(dim=1), n

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata=None) -> dict[str, torch.Tensor]:
        """Score images [B, 3, H, W] (float in [0, 1]) against B prompts; metadata is ignored."""
        check_batch(images, prompts, self.batch_size)
        pil = pil_images(images)
        sums, counts = [], []
        for start in range(0, len(prompts), self.batch_size):
            s, n = self.score(pil[start : start + self.batch_size], prompts[start : start + self.batch_size])
            sums.append(s)
            counts.append(n)
        total, tokens = torch.cat(sums), torch.cat(counts).float()
        mean = total / tokens
        out = {"reward": mean if self.reduction == "mean" else total, "logprob_mean": mean, "logprob_sum": total, "prompt_tokens": tokens}
        return {k: v.float().to(images.device) for k, v in out.items()}


class VlmPairwisePreference:
    """A pairwise preference judge for the win-rate reward (Pref-GRPO judges pairs with a VLM).

    For an ordered pair (a, b) the VLM sees image a then image b and `question`; P_first(a, b) =
    P(first) / (P(first) + P(second)) of its next token (first_words / second_words, "1" / "2" by
    default). VLM judges favour one position, so both orders are asked and
    P(a beats b) = (P_first(a, b) + 1 - P_first(b, a)) / 2, which makes P + P.T = 1 exactly (and 0.5 on
    the diagonal). Cost: n (n - 1) VLM calls per group of n, batch_size at a time.

    path, system_prompt, device, dtype, batch_size: as VlmYesNoJudge. question: template with {prompt}.
    """

    def __init__(self, path: str, question: str = DEFAULT_PAIR_QUESTION, system_prompt: str | None = None,
                 first_words: tuple[str, ...] = ("1",), second_words: tuple[str, ...] = ("2",), device: str = "auto",
                 dtype: str = "bfloat16", batch_size: int = 8) -> None:
        try:
            question.format(prompt="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"question may only use the placeholder {{prompt}} (write {{{{ }}}} for literal braces): {question!r}") from e
        if not all(isinstance(w, str) for w in [*first_words, *second_words]):
            raise ValueError(f"first_words and second_words must be strings (quote them in YAML), got {first_words}, {second_words}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.vlm = LocalVlm(path, device, dtype, type(self).__name__)
        self.question, self.system_prompt, self.batch_size = question, system_prompt, int(batch_size)
        self.first_ids = word_ids(self.vlm, first_words, type(self).__name__)
        self.second_ids = word_ids(self.vlm, second_words, type(self).__name__)

    @torch.no_grad()
    def first_preferred(self, first: list[Image.Image], second: list[Image.Image], prompt: str) -> torch.Tensor:
        """[k] P_first for k ordered pairs (first[i] shown before second[i])."""
        text = self.vlm.prompt_text(self.question.format(prompt=prompt), 2, self.system_prompt)
        out = []
        for s in range(0, len(first), self.batch_size):
            pairs = list(zip(first[s : s + self.batch_size], second[s : s + self.batch_size]))
            batch = self.vlm.inputs([text] * len(pairs), [im for pair in pairs for im in pair])
            probs = self.vlm.model(**batch, logits_to_keep=1).logits[:, -1].float().softmax(dim=-1)
            p1, p2 = probs[:, self.first_ids].sum(dim=-1), probs[:, self.second_ids].sum(dim=-1)
            out.append((p1 / (p1 + p2)).cpu())
        return torch.cat(out)

    def preference(self, images: torch.Tensor, prompt: str) -> torch.Tensor:
        """[n, n] P(i beats j) for images [n, 3, H, W] in [0, 1] of one prompt."""
        pil = pil_images(images)
        n = len(pil)
        order = [(i, j) for i in range(n) for j in range(n) if i != j]
        p_first = torch.full((n, n), 0.5)
        if order:
            values = self.first_preferred([pil[i] for i, _ in order], [pil[j] for _, j in order], prompt)
            for (i, j), v in zip(order, values.tolist()):
                p_first[i, j] = v
        return (p_first + 1 - p_first.T) / 2
