"""A fake OpenAI-compatible chat-completions server (stdlib, in a thread) for the VLM judge's tests.

It answers like vLLM does with ``logprobs: true``: one token and its ``top_logprobs``. The judge's
answer is derived from the request, so a test can tell whether the client sent the right image:
P(yes) = the mean of the PNG's pixels / 255 (clipped to [0.02, 0.98]), split over "Yes"/" yes"
(0.9 of the mass) and "No"/" no", with "Maybe" taking the remaining 0.1.
"""
from __future__ import annotations

import base64
import io
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

DATA_URL_PREFIX = "data:image/png;base64,"


def p_yes(pixels: np.ndarray) -> float:
    """The fake judge's P(yes) for an image (uint8 [H, W, 3])."""
    return min(0.98, max(0.02, float(pixels.astype(np.float64).mean() / 255)))


def logprob_answer(p: float) -> dict:
    """A vLLM-style answer whose first token is the likelier of Yes/No, with top_logprobs."""
    top = [("Yes", 0.8 * p), (" yes", 0.1 * p), ("No", 0.8 * (1 - p)), (" no", 0.1 * (1 - p)), ("Maybe", 0.1)]
    top.sort(key=lambda t: -t[1])
    alts = [{"token": t, "logprob": math.log(q), "bytes": list(t.encode())} for t, q in top]
    return {"message": {"role": "assistant", "content": top[0][0]},
            "logprobs": {"content": [{"token": top[0][0], "logprob": alts[0]["logprob"], "top_logprobs": alts}]}}


class FakeOpenAI(ThreadingHTTPServer):
    """``mode``: "logprobs" (above), "text" (content "Yes"/"No" by p > 0.5, no logprobs) or
    "garbage" (content "I cannot tell", no logprobs). ``delay_s`` stalls each answer;
    ``fail_first`` answers HTTP 500 to that many requests first; ``api_key`` demands that bearer
    token (401 otherwise). ``requests`` records every parsed body; ``max_in_flight`` the most
    requests answered at once."""

    daemon_threads = True

    def __init__(self, mode: str = "logprobs", delay_s: float = 0.0, fail_first: int = 0, api_key: str | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.mode, self.delay_s, self.fail_first, self.api_key = mode, delay_s, fail_first, api_key
        self.requests: list[dict] = []
        self.images: list[np.ndarray] = []
        self.in_flight = self.max_in_flight = self.count = 0
        self.lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, args=(0.02,), daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def __enter__(self) -> "FakeOpenAI":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: FakeOpenAI

    def log_message(self, *args) -> None:
        pass

    def _answer(self, status: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        fake = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with fake.lock:
            fake.count += 1
            number = fake.count
            fake.requests.append(body)
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        try:
            time.sleep(fake.delay_s)
            if self.path != "/v1/chat/completions":
                return self._answer(404, {"error": {"message": f"no route {self.path}"}})
            if fake.api_key and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                return self._answer(401, {"error": {"message": "bad api key"}})
            if number <= fake.fail_first:
                return self._answer(500, {"error": {"message": "engine hiccup"}})
            parts = body["messages"][-1]["content"]
            url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
            assert url.startswith(DATA_URL_PREFIX), url[:40]
            pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(url[len(DATA_URL_PREFIX):]))).convert("RGB"))
            with fake.lock:
                fake.images.append(pixels)
            p = p_yes(pixels)
            if fake.mode == "logprobs":
                choice = logprob_answer(p)
            else:
                text = ("Yes." if p > 0.5 else "No.") if fake.mode == "text" else "I cannot tell"
                choice = {"message": {"role": "assistant", "content": text}, "logprobs": None}
            self._answer(200, {"id": f"chatcmpl-{number}", "object": "chat.completion", "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": "length", **choice}]})
        finally:
            with fake.lock:
                fake.in_flight -= 1
