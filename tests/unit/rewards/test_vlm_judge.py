"""The OpenAI-compatible VLM judge against a fake chat-completions server (fake_openai.py) that
answers with logprobs derived from the image it received."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai import FakeOpenAI, logprob_answer, p_yes  # noqa: E402

from rewards.protocol import quantize  # noqa: E402
from rewards.vlm_judge import OpenAIJudge  # noqa: E402


def greys(*levels: float) -> torch.Tensor:
    """[B, 3, 8, 8] flat images at the given grey levels, plus a little per-image noise."""
    g = torch.Generator().manual_seed(0)
    return torch.stack([(torch.full((3, 8, 8), v) + 0.02 * torch.rand(3, 8, 8, generator=g)).clamp(0, 1) for v in levels])


def test_reward_is_p_yes_normalised_over_yes_and_no_tokens():
    images = greys(0.1, 0.5, 0.9)
    prompts = ["a cat", "a dog", 'a sign that says "hi"']
    with FakeOpenAI() as fake:
        judge = OpenAIJudge(fake.base_url, model="tiny-vlm", question="Is this {prompt}? Say yes or no.", top_logprobs=5)
        out = judge(images, prompts)
    expected = torch.tensor([p_yes(p) for p in quantize(images)])
    # The fake puts 0.9 of the mass on Yes/ yes/No/ no and 0.1 on Maybe: normalising must remove
    # Maybe. Dropping the " yes"/" no" variants would keep the ratio here, so the mass pins them.
    torch.testing.assert_close(out["reward"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(out["yes_no_mass"], torch.full((3,), 0.9), rtol=0, atol=1e-6)
    assert out["text_fallback"].sum() == 0 and out["unparsed"].sum() == 0 and out["failed"].sum() == 0
    # What went over the wire: one request per image, in any order, each with its own prompt.
    sent = sorted(r["messages"][-1]["content"][1]["text"] for r in fake.requests)
    assert sent == sorted(f"Is this {p}? Say yes or no." for p in prompts)
    first = fake.requests[0]
    assert first["model"] == "tiny-vlm" and first["logprobs"] is True and first["top_logprobs"] == 5
    assert first["max_tokens"] == 1 and first["temperature"] == 0
    # The PNGs decode to exactly the 8-bit images (the fake scored what it decoded).
    assert sorted(p.tobytes() for p in fake.images) == sorted(p.tobytes() for p in quantize(images))


def test_extra_body_from_a_config_node_reaches_the_request():
    extra = OmegaConf.create({"chat_template_kwargs": {"enable_thinking": False}, "top_k": 1})
    with FakeOpenAI() as fake:
        OpenAIJudge(fake.base_url, model="m", extra_body=extra, system_prompt="Be strict.")(greys(0.5), ["a"])
    sent = fake.requests[0]
    assert sent["chat_template_kwargs"] == {"enable_thinking": False} and sent["top_k"] == 1
    assert sent["messages"][0] == {"role": "system", "content": "Be strict."}


def test_first_position_with_a_yes_or_no_alternative_is_used():
    judge = OpenAIJudge("http://127.0.0.1:1/v1", model="m", max_tokens=3)
    preamble = {"token": "Answer", "logprob": -0.01, "top_logprobs": [{"token": "Answer", "logprob": -0.01}]}
    answer = logprob_answer(0.3)
    answer["logprobs"]["content"].insert(0, preamble)
    score, mass, fallback, unparsed = judge.judge({"choices": [answer]})
    assert math.isclose(score, 0.3, abs_tol=1e-9) and math.isclose(mass, 0.9, abs_tol=1e-9)
    assert not fallback and not unparsed


def test_text_answers_are_parsed_with_a_counted_warning():
    with FakeOpenAI(mode="text") as fake:
        judge = OpenAIJudge(fake.base_url, model="m")
        with pytest.warns(RuntimeWarning, match="text_fallback"):
            out = judge(greys(0.1, 0.9), ["a", "b"])
    assert out["reward"].tolist() == [0.0, 1.0]
    assert out["text_fallback"].tolist() == [1.0, 1.0] and judge.text_fallbacks == 2
    assert torch.isnan(out["yes_no_mass"]).all()


def test_an_answer_that_is_neither_yes_nor_no_is_nan_and_counted():
    with FakeOpenAI(mode="garbage") as fake:
        out = OpenAIJudge(fake.base_url, model="m")(greys(0.5), ["a"])
        zero = OpenAIJudge(fake.base_url, model="m", unparsed_value=0.0)(greys(0.5), ["a"])
    assert torch.isnan(out["reward"]).all() and out["unparsed"].tolist() == [1.0]
    assert zero["reward"].tolist() == [0.0]


def test_requests_run_concurrently_up_to_the_limit():
    with FakeOpenAI(delay_s=0.15) as fake:
        judge = OpenAIJudge(fake.base_url, model="m", concurrency=4)
        t0 = time.perf_counter()
        out = judge(greys(*[0.5] * 8), ["a"] * 8)
        elapsed = time.perf_counter() - t0
    assert fake.max_in_flight == 4, fake.max_in_flight
    assert elapsed < 8 * 0.15, elapsed  # sequential requests would take 1.2 s
    assert out["reward"].shape == (8,)


def test_transient_errors_are_retried():
    with FakeOpenAI(fail_first=2) as fake:
        out = OpenAIJudge(fake.base_url, model="m", retries=2, backoff_s=0.01, concurrency=1)(greys(0.2), ["a"])
    assert fake.count == 3 and math.isclose(out["reward"].item(), p_yes(quantize(greys(0.2))[0]), abs_tol=1e-6)


def test_exhausted_retries_fail_with_the_url_and_the_cause():
    with FakeOpenAI(fail_first=10) as fake:
        judge = OpenAIJudge(fake.base_url, model="m", retries=1, backoff_s=0.01)
        with pytest.raises(RuntimeError, match=r"chat/completions.*2 attempt.*HTTP 500: engine hiccup"):
            judge(greys(0.2), ["a"])
    assert fake.count == 2


def test_a_stalled_server_times_out_and_skip_scores_nan():
    with FakeOpenAI(delay_s=1.5) as fake:
        judge = OpenAIJudge(fake.base_url, model="m", timeout_s=0.2, retries=1, backoff_s=0.01, on_failure="skip")
        t0 = time.perf_counter()
        with pytest.warns(RuntimeWarning, match="timed out"):
            out = judge(greys(0.2, 0.8), ["a", "b"])
        elapsed = time.perf_counter() - t0
    assert elapsed < 1.2, elapsed  # 2 attempts x 0.2 s, not the server's 1.5 s
    assert torch.isnan(out["reward"]).all() and out["failed"].tolist() == [1.0, 1.0]


def test_api_key_is_sent_and_a_wrong_one_fails_at_once(monkeypatch):
    with FakeOpenAI(api_key="sk-local") as fake:
        monkeypatch.setenv("JUDGE_KEY", "sk-local")
        assert OpenAIJudge(fake.base_url, model="m", api_key_env="JUDGE_KEY")(greys(0.5), ["a"])["failed"].item() == 0
        wrong = OpenAIJudge(fake.base_url, model="m", api_key="nope", retries=3, backoff_s=1.0, on_failure="skip")
        t0 = time.perf_counter()
        with pytest.raises(RuntimeError, match="HTTP 401: bad api key"):
            wrong(greys(0.5), ["a"])
        assert time.perf_counter() - t0 < 0.5  # 401 is permanent: no retries, no backoff, no skip


@pytest.mark.parametrize("kwargs, match", [
    ({"question": "Is {subject} here?"}, "placeholder"),
    ({"top_logprobs": 50}, "top_logprobs"),
    ({"yes_words": ("yes",), "no_words": ("Yes",)}, "disjoint"),
    ({"on_failure": "ignore"}, "on_failure"),
    ({"yes_words": [True]}, "quote them in YAML"),
])
def test_bad_configuration_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OpenAIJudge("http://127.0.0.1:1/v1", model="m", **kwargs)
