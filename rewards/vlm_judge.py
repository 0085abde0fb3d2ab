"""A VLM judge behind an OpenAI-compatible chat-completions API (vLLM, SGLang, or any server that
returns ``logprobs``): reward = P("yes") to a yes/no question about each image.

For every image the judge sends one chat request: the image as a PNG data URL (an ``image_url``
content part) and the question (a template with ``{prompt}``), asking for one token with its
``top_logprobs``. The reward is the probability of the "yes" tokens normalised over "yes" and
"no" (RewardDance-style), which is smooth where a parsed answer would be 0 or 1. Requests run in
a thread pool so the server can batch them (vLLM and SGLang batch concurrent requests on the GPU).

Start a server, e.g.: ``vllm serve Qwen/Qwen2.5-VL-7B-Instruct --port 8001 --max-logprobs 20``.
"""
from __future__ import annotations

import base64
import json
import math
import os
import re
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
from omegaconf import OmegaConf

from rewards.http_client import RequestError, request_json
from rewards.protocol import png_bytes, quantize

DEFAULT_QUESTION = 'Does this image show "{prompt}"? Answer yes or no.'
# Token spellings differ by tokenizer: GPT-2 style BPE marks a leading space with "Ġ", SentencePiece
# with "▁"; servers usually decode them to " ", but not all do.
_TOKEN_MARKS = str.maketrans({"Ġ": " ", "▁": " "})
_FIRST_WORD = re.compile(r"[^\w]*(\w+)")


def normalise_token(token: str) -> str:
    """A token as a word: space markers and surrounding whitespace/punctuation removed, lower case."""
    return token.translate(_TOKEN_MARKS).strip().strip(".,!?:;\"'`*").lower()


class OpenAIJudge:
    """reward = P(yes) / (P(yes) + P(no)) in [0, 1] for ``question.format(prompt=prompt)`` about each image.

    base_url: the API root, e.g. ``http://127.0.0.1:8001/v1`` (requests go to ``<base_url>/chat/completions``).
    model: the served model name. question: a template using only ``{prompt}``. system_prompt: optional.
    yes_words, no_words: answers counted as yes / no after `normalise_token` ("Yes", " yes", "YES." ...).
    top_logprobs: alternatives asked for per token (vLLM caps it at its --max-logprobs, 20 by default).
    max_tokens: tokens generated; the first position whose alternatives include a yes or no word is
      used (raise it for models that emit a preamble first). temperature: 0, greedy, by default.
    When the answer carries no logprobs with a yes/no word, the text is parsed (first word yes -> 1,
    no -> 0), counted in the "text_fallback" component, with a warning the first time; an answer
    that is neither scores ``unparsed_value`` (default NaN: the trainer then skips the update) and
    counts in "unparsed".
    timeout_s (per socket operation), retries, backoff_s: as in `rewards.http_client.request_json`.
    concurrency: requests in flight at once. on_failure: "fail" raises RuntimeError naming the url and
      the cause once a request's attempts are spent; "skip" warns and scores that image NaN (counted in
      "failed"). Permanent errors (4xx other than 408/429) always raise.
    api_key: sent as a bearer token; when None, read from the environment variable ``api_key_env``
      if one is named. extra_body: more request fields, merged last (e.g.
      ``{"chat_template_kwargs": {"enable_thinking": false}}`` for Qwen3).
    Returns float32 [B] tensors on images.device: "reward", "yes_no_mass" (the probability the top
    alternatives put on yes + no; low means the question does not get a yes/no answer; NaN without
    logprobs), "text_fallback", "unparsed", "failed" (0/1 each).
    """

    input_kind = "pixels"
    differentiable = False

    def __init__(self, base_url: str, model: str, question: str = DEFAULT_QUESTION, system_prompt: str | None = None,
                 yes_words: tuple[str, ...] = ("yes",), no_words: tuple[str, ...] = ("no",), top_logprobs: int = 20,
                 max_tokens: int = 1, temperature: float = 0.0, timeout_s: float = 60.0, retries: int = 2,
                 backoff_s: float = 1.0, concurrency: int = 8, on_failure: str = "fail", api_key: str | None = None,
                 api_key_env: str | None = None, unparsed_value: float = math.nan, extra_body: dict | None = None) -> None:
        problems = []
        try:
            question.format(prompt="")
        except (KeyError, IndexError, ValueError) as e:
            problems.append(f"question may only use the placeholder {{prompt}} (write {{{{ }}}} for literal braces): "
                            f"{question!r} fails with {type(e).__name__}: {e}")
        if not base_url.startswith(("http://", "https://")):
            problems.append(f"base_url must start with http:// or https://, got {base_url!r}")
        if not 1 <= top_logprobs <= 20:
            problems.append(f"top_logprobs must be in [1, 20] (the OpenAI API's range), got {top_logprobs}")
        if max_tokens < 1 or concurrency < 1 or timeout_s <= 0 or retries < 0 or backoff_s < 0:
            problems.append(f"need max_tokens >= 1 ({max_tokens}), concurrency >= 1 ({concurrency}), timeout_s > 0 "
                            f"({timeout_s}), retries >= 0 ({retries}), backoff_s >= 0 ({backoff_s})")
        if on_failure not in ("fail", "skip"):
            problems.append(f"on_failure must be 'fail' or 'skip', got {on_failure!r}")
        words = [*yes_words, *no_words]
        if not all(isinstance(w, str) for w in words):
            # YAML 1.1 reads bare yes/no as booleans: the config must quote them.
            problems.append(f"yes_words and no_words must be strings (quote them in YAML), got {words}")
            yes_words, no_words = ("yes",), ("no",)
        yes = {normalise_token(w) for w in yes_words}
        no = {normalise_token(w) for w in no_words}
        if not yes or not no or yes & no or "" in yes | no:
            problems.append(f"yes_words {list(yes_words)} and no_words {list(no_words)} must be non-empty and disjoint")
        if problems:
            raise ValueError("OpenAIJudge: " + "; ".join(problems))
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.question, self.system_prompt = model, question, system_prompt
        self.yes, self.no = yes, no
        self.top_logprobs, self.max_tokens, self.temperature = int(top_logprobs), int(max_tokens), float(temperature)
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self.concurrency, self.on_failure, self.unparsed_value = int(concurrency), on_failure, float(unparsed_value)
        # Hydra hands nested config nodes over as DictConfig, which json cannot write.
        self.extra_body = OmegaConf.to_container(extra_body) if OmegaConf.is_config(extra_body) else dict(extra_body or {})
        key = api_key if api_key is not None else (os.environ.get(api_key_env) if api_key_env else None)
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._pool: ThreadPoolExecutor | None = None  # made on the first call: construction stays cheap
        self.text_fallbacks = 0  # answers scored from their text, since construction
        self._lock = threading.Lock()  # judge() runs on the pool's threads

    def _body(self, png: bytes, prompt: str) -> bytes:
        content = [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode("ascii")}},
            {"type": "text", "text": self.question.format(prompt=prompt)},
        ]
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + [
            {"role": "user", "content": content}]
        body = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens, "temperature": self.temperature,
                "n": 1, "logprobs": True, "top_logprobs": self.top_logprobs, **self.extra_body}
        return json.dumps(body).encode("utf-8")

    def judge(self, answer: dict) -> tuple[float, float, bool, bool]:
        """One chat-completions answer -> (score, yes_no_mass, text_fallback, unparsed)."""
        try:
            choice = answer["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise RuntimeError(f"{self.url} answered without choices: {str(answer)[:300]}") from None
        for position in (choice.get("logprobs") or {}).get("content") or []:
            # One logprob per distinct token string: the chosen token is usually listed among the alternatives too.
            alternatives = {alt["token"]: alt["logprob"] for alt in position.get("top_logprobs") or []}
            alternatives.setdefault(position.get("token", ""), position.get("logprob", -math.inf))
            yes = sum(math.exp(lp) for tok, lp in alternatives.items() if normalise_token(tok) in self.yes)
            no = sum(math.exp(lp) for tok, lp in alternatives.items() if normalise_token(tok) in self.no)
            if yes + no > 0:
                return yes / (yes + no), yes + no, False, False
        text = ((choice.get("message") or {}).get("content") or "").lower()
        match = _FIRST_WORD.match(text)
        word = match.group(1) if match else ""
        if word in self.yes or word in self.no:
            with self._lock:
                self.text_fallbacks += 1
                first = self.text_fallbacks == 1
            if first:
                warnings.warn(f"{self.url}: no yes/no logprobs in the answer ({text[:40]!r}); scoring from the text, "
                              "0 or 1 (counted in the 'text_fallback' component)", RuntimeWarning, stacklevel=2)
            return float(word in self.yes), math.nan, True, False
        return self.unparsed_value, math.nan, False, True

    def _one(self, png: bytes, prompt: str) -> tuple[float, float, bool, bool, bool]:
        try:
            answer = request_json(self.url, self._body(png, prompt), headers=self._headers, timeout_s=self.timeout_s,
                                  retries=self.retries, backoff_s=self.backoff_s)
        except RequestError as e:
            if self.on_failure == "fail" or not e.transient:
                raise RuntimeError(f"VLM judge {self.url}: {e}") from e
            warnings.warn(f"VLM judge {self.url}: {e}; scoring the image NaN (on_failure=skip)", RuntimeWarning,
                          stacklevel=2)
            return math.nan, math.nan, False, False, True
        return (*self.judge(answer), False)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata=None) -> dict[str, torch.Tensor]:
        """Score images [B, 3, H, W] (float in [0, 1]) against their prompts; metadata is ignored."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images need as many prompts, got {len(prompts)}")
        pngs = [png_bytes(p) for p in quantize(images)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="vlm-judge")
        rows = list(self._pool.map(self._one, pngs, prompts))
        columns = zip(*rows) if rows else [()] * 5
        names = ("reward", "yes_no_mass", "text_fallback", "unparsed", "failed")
        return {name: torch.tensor([float(v) for v in values], dtype=torch.float32, device=images.device)
                for name, values in zip(names, columns)}
