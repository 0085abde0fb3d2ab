"""The reward server: the real CLI in a subprocess and in-thread servers built by the CLI's own
functions score exactly like the local reward; batching, the dedup cache, limits and the token
work as /v1/metrics says; bad input gets a 4xx naming the problem and never stops the server."""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from launch.serve_reward import ServeConfig, build_server
from rewards.image_stats import ImageStatistic
from rewards.jpeg import JpegCompressibility
from rewards.protocol import dequantize, encode_image, encode_request, quantize
from rewards.remote import RemoteReward
from rewards.server import ServerOptions, make_server

REPO = Path(__file__).resolve().parents[3]


def images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def local(reward, x: torch.Tensor, prompts=None, metadata=None) -> dict:
    """What the trainer computes locally on the 8-bit version of x (what the wire carries)."""
    out = reward(dequantize(quantize(x)), prompts or [""] * len(x), metadata)
    return out if isinstance(out, dict) else {"reward": out}


@contextmanager
def serving(reward, name: str = "probe", **options):
    server = make_server(reward, name, options=ServerOptions(**options))
    server.start()
    try:
        yield server
    finally:
        server.close()


def call(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """One raw HTTP exchange (no retries, no client logic): (status, parsed JSON body)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def score_body(x: torch.Tensor, prompts=None, fmt: str = "raw", metadata=None) -> bytes:
    return encode_request([encode_image(p, fmt) for p in quantize(x)], prompts or [""] * len(x), metadata)


def metrics(server) -> dict:
    return call(server, "GET", "/v1/metrics")[1]


def assert_healthy(server) -> None:
    status, health = call(server, "GET", "/v1/health")
    assert status == 200 and health["status"] == "ok", health


# --- the CLI -------------------------------------------------------------------------------------


def test_cli_serves_a_reward_config_with_overrides_like_the_local_reward():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("STEERFLOW_REWARD_TOKEN", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "launch.serve_reward", "reward=brightness", "reward.target=0.5", "port=0", "max_batch=16"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        first = process.stdout.readline()
        assert first.startswith("serving reward 'brightness'"), first + process.stdout.read()
        url = first.rsplit(" at ", 1)[1].strip()
        x = images(5)
        expected = local(ImageStatistic("brightness", target=0.5), x)  # the override reached the constructor
        for fmt in ("raw", "png"):
            out = RemoteReward(url, image_format=fmt, retries=0)(x, [""] * 5)
            assert set(out) == {"reward", "brightness"}
            assert torch.equal(out["reward"], expected["reward"]) and torch.equal(out["brightness"], expected["brightness"])
        process.send_signal(signal.SIGTERM)  # ends cleanly, like Ctrl-C
        rest, _ = process.communicate(timeout=10)
        assert process.returncode == 0 and "stopping" in rest, rest
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def _compose_serve(*overrides: str) -> ServeConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return OmegaConf.to_object(compose("serve_reward", overrides=list(overrides)))


def test_composed_config_builds_a_jpeg_server_that_matches_locally():
    """The CLI's own path minus the HTTP loop: compose conf/serve_reward.yaml, build_server()."""
    cfg = _compose_serve("reward=jpeg_compressibility", "reward.quality=80", "port=0", "name=jpeg")
    assert isinstance(cfg, ServeConfig) and cfg.host == "127.0.0.1" and cfg.torch_threads == 1
    server = build_server(cfg)
    server.start()
    try:
        x = images(4, size=24)
        expected = local(JpegCompressibility(quality=80), x)
        for fmt in ("raw", "png"):
            out = RemoteReward(server.url, image_format=fmt, retries=0)(x, [""] * 4)
            assert torch.equal(out["reward"], expected["reward"]) and torch.equal(out["jpeg_kb"], expected["jpeg_kb"])
        health = call(server, "GET", "/v1/health")[1]
        assert health["reward"] == "jpeg" and health["target"] == "rewards.jpeg.JpegCompressibility"
        assert health["versions"] == [1] and health["auth"] is False and health["max_request_bytes"] == 64 * 2**20
    finally:
        server.close()
    assert torch.get_num_threads() == 1  # set deliberately by build_server


def test_config_typos_and_remote_hosts_are_refused():
    with pytest.raises(Exception, match="max_batchh"):
        _compose_serve("reward=brightness", "max_batchh=3")
    with pytest.raises(ValueError, match="allow_remote=true"):
        build_server(_compose_serve("reward=brightness", "host=0.0.0.0", "port=0"))
    with pytest.warns(RuntimeWarning, match="WITHOUT a token"):
        server = build_server(_compose_serve("reward=brightness", "host=0.0.0.0", "port=0", "allow_remote=true"))
    server.close()


# --- batching and the cache -----------------------------------------------------------------------


class Gated:
    """Wraps a reward; its first call blocks until ``release`` is set (a busy reward, on demand)."""

    input_kind, differentiable = "pixels", False

    def __init__(self, inner):
        self.inner, self.release, self.calls = inner, threading.Event(), 0

    def __call__(self, images, prompts, metadata=None):
        self.calls += 1
        if self.calls == 1:
            assert self.release.wait(20), "the test never released the reward"
        return self.inner(images, prompts, metadata)


def wait_for(server, key: str, value: int) -> None:
    deadline = time.monotonic() + 20
    while metrics(server)[key] < value:
        assert time.monotonic() < deadline, (key, value, metrics(server))
        time.sleep(0.01)


def _in_threads(server, bodies: list[bytes]) -> tuple[list, list[threading.Thread]]:
    results: list = [None] * len(bodies)

    def post(i: int) -> None:
        results[i] = call(server, "POST", "/v1/score", bodies[i])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    return results, threads


def _merged_behind_a_busy_reward(server, reward: Gated, first: bytes, rest: list[bytes]) -> list:
    """Send ``first``; while the reward is busy with it, queue ``rest``; release; all answers."""
    head, threads = _in_threads(server, [first])
    wait_for(server, "jobs", 1)
    tail, more = _in_threads(server, rest)
    wait_for(server, "jobs", 1 + len(rest))
    reward.release.set()
    for t in threads + more:
        t.join()
    return head + tail


def test_requests_queued_while_the_reward_is_busy_form_one_batch_and_get_their_own_scores():
    brightness = ImageStatistic("brightness")
    reward = Gated(brightness)
    parts = [images(2, seed=i) for i in range(5)]
    with serving(reward, max_batch=8, batch_wait_ms=0) as server:
        results = _merged_behind_a_busy_reward(server, reward, score_body(parts[0]), [score_body(x) for x in parts[1:]])
        m = metrics(server)
    for (status, body), x in zip(results, parts):
        assert status == 200, body
        # Each request gets its own images' scores. Not asserted bitwise: a merged batch may round
        # differently from a batch of 2 (vectorised kernels block by batch size), as locally.
        torch.testing.assert_close(torch.tensor(body["reward"], dtype=torch.float32), local(brightness, x)["reward"],
                                   rtol=1e-6, atol=0)
    assert (m["rounds"], m["batches"], m["max_requests_merged"], m["images_scored"]) == (2, 2, 4, 10), m


def test_the_batcher_waits_for_a_request_still_arriving_but_not_for_nobody():
    with serving(ImageStatistic("brightness"), batch_wait_ms=5000) as server:
        t0 = time.perf_counter()
        assert call(server, "POST", "/v1/score", score_body(images(2)))[0] == 200
        assert time.perf_counter() - t0 < 2  # alone: no 5 s wait
    with serving(ImageStatistic("brightness"), batch_wait_ms=5000) as server:
        slow = score_body(images(2, seed=1))
        with socket.create_connection(server.server_address[:2], timeout=10) as s:
            s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(slow) + slow[:100])
            wait_for(server, "requests", 1)
            time.sleep(0.1)  # the handler is now reading the body
            fast, threads = _in_threads(server, [score_body(images(2, seed=2))])
            wait_for(server, "jobs", 1)
            time.sleep(0.2)
            s.sendall(slow[100:])
            assert s.recv(100).startswith(b"HTTP/1.0 200")
        threads[0].join()
        m = metrics(server)
    assert fast[0][0] == 200 and (m["rounds"], m["max_requests_merged"]) == (1, 2), m


def test_batches_respect_max_batch_and_image_sizes():
    reward = ImageStatistic("brightness")
    mixed = [images(3, size=8, seed=1), images(2, size=12, seed=2)]
    with serving(reward, max_batch=2, batch_wait_ms=0) as server:
        body = encode_request([encode_image(p, "raw") for x in mixed for p in quantize(x)], [""] * 5, None)
        status, answer = call(server, "POST", "/v1/score", body)
        m = metrics(server)
    assert status == 200
    expected = torch.cat([local(reward, x)["reward"] for x in mixed])
    torch.testing.assert_close(torch.tensor(answer["reward"], dtype=torch.float32), expected, rtol=1e-6, atol=0)
    # 3 small images in chunks of <= 2, then the 2 larger ones: 3 reward calls.
    assert (m["batches"], m["max_batch_images"], m["images_scored"]) == (3, 2, 5), m


class PromptLength:
    """A reward that reads prompts and metadata: len(prompt) + metadata["bonus"] (0 without)."""

    input_kind, differentiable = "pixels", False

    def __init__(self):
        self.calls = 0

    def __call__(self, images, prompts, metadata=None):
        self.calls += 1
        bonus = [m.get("bonus", 0) for m in metadata] if metadata else [0] * len(prompts)
        return torch.tensor([len(p) + b for p, b in zip(prompts, bonus)], dtype=torch.float32)


def test_identical_inputs_are_scored_once_and_the_key_covers_prompt_and_metadata():
    x = images(3)
    with serving(PromptLength()) as server:
        first = call(server, "POST", "/v1/score", score_body(x, ["a", "bb", "ccc"]))[1]
        again = call(server, "POST", "/v1/score", score_body(x, ["a", "bb", "ccc"]))[1]
        m = metrics(server)
        assert first["reward"] == again["reward"] == [1.0, 2.0, 3.0]
        assert (first["cache_hits"], again["cache_hits"]) == (0, 3)
        assert (m["cache_hits"], m["images_scored"]) == (3, 3), m
        # Same pixels, other prompt / metadata: scored anew, with the new answer.
        other = call(server, "POST", "/v1/score", score_body(x[:1], ["dddd"]))[1]
        meta = call(server, "POST", "/v1/score", score_body(x[:1], ["a"], metadata=[{"bonus": 10}]))[1]
        assert (other["reward"], other["cache_hits"]) == ([4.0], 0) and (meta["reward"], meta["cache_hits"]) == ([11.0], 0)
        # Duplicates inside one request are scored once too.
        dup = call(server, "POST", "/v1/score", score_body(torch.cat([x[1:2]] * 3), ["zz"] * 3))[1]
        m = metrics(server)
        assert dup["reward"] == [2.0] * 3 and (m["dedup_hits"], m["images_scored"]) == (2, 6), m


def test_cache_size_zero_scores_everything():
    reward = PromptLength()
    with serving(reward, cache_size=0) as server:
        for _ in range(2):
            assert call(server, "POST", "/v1/score", score_body(images(2), ["a", "a"]))[1]["cache_hits"] == 0
        m = metrics(server)
    assert (m["cache_hits"], m["dedup_hits"], m["images_scored"], reward.calls) == (0, 0, 4, 2)


# --- bad input ----------------------------------------------------------------------------------


class Fragile:
    """Brightness, but raises on the prompt "boom", exits on "exit" and returns too few scores on "short"."""

    input_kind, differentiable = "pixels", False

    def __call__(self, images, prompts, metadata=None):
        if "exit" in prompts:
            raise SystemExit(3)
        if "boom" in prompts:
            raise ValueError("cannot parse 'boom'")
        out = images.mean(dim=(1, 2, 3))
        return out[:-1] if "short" in prompts else out


@pytest.fixture(scope="module")
def guarded():
    """A server with a token, a 64 KiB request limit and a reward that can fail."""
    with serving(Fragile(), name="fragile", token="s3cret", max_request_bytes=64 * 1024, batch_wait_ms=0) as server:
        yield server


AUTH = {"Authorization": "Bearer s3cret"}


@pytest.mark.parametrize("case, status, code, match", [
    ("malformed json", 400, "bad_json", "not valid JSON"),
    ("wrong shape", 400, "bad_request", r"must be \[H, W, 3\]"),
    ("wrong dtype", 400, "bad_request", "dtype must be 'uint8'"),
    ("bad base64", 400, "bad_request", "not valid base64"),
    ("missing field", 400, "bad_request", "missing field 'prompts'"),
    ("unknown version", 400, "unsupported_version", r"version 7 is not supported; this server speaks \[1\]"),
    ("too large", 413, "too_large", "exceeds this server's limit of 65536 bytes"),
    ("no token", 401, "unauthorized", "missing bearer token"),
    ("wrong token", 401, "unauthorized", "wrong bearer token"),
    ("reward raises", 500, "reward_failed", r"reward 'fragile' failed on a batch of 1 image\(s\): ValueError: cannot parse"),
    ("reward exits", 500, "reward_failed", "reward 'fragile' failed on a batch of 1 image\\(s\\): SystemExit: 3"),
    ("reward short", 500, "reward_failed", "reward 'fragile' returned 1 values for 'reward' on a batch of 2"),
    ("wrong path", 404, "not_found", "no endpoint"),
])
def test_bad_requests_get_an_error_and_the_server_lives_on(guarded, case, status, code, match):
    good = json.loads(score_body(images(1)))
    body = {
        "malformed json": b'{"version": 1, "images": [',
        "wrong shape": json.dumps({**good, "images": [{**good["images"][0], "shape": [16, 16, 4]}]}).encode(),
        "wrong dtype": json.dumps({**good, "images": [{**good["images"][0], "dtype": "float32"}]}).encode(),
        "bad base64": json.dumps({**good, "images": [{**good["images"][0], "data": "not base64!"}]}).encode(),
        "missing field": json.dumps({k: v for k, v in good.items() if k != "prompts"}).encode(),
        "unknown version": json.dumps({**good, "version": 7}).encode(),
        "too large": score_body(images(30, size=32)),  # ~120 KiB of base64
        "reward raises": score_body(images(1), ["boom"]),
        "reward exits": score_body(images(1), ["exit"]),
        "reward short": score_body(images(2), ["short", "x"]),
    }.get(case, score_body(images(1)))
    headers = {"no token": {}, "wrong token": {"Authorization": "Bearer s3cre"}}.get(case, AUTH)
    path = "/v2/score" if case == "wrong path" else "/v1/score"
    errors_before = metrics(guarded)["errors"]
    got, answer = call(guarded, "POST", path, body, headers)
    assert (got, answer["error"]["status"], answer["error"]["code"]) == (status, status, code), answer
    assert re.search(match, answer["error"]["message"]), answer["error"]["message"]
    assert_healthy(guarded)
    assert metrics(guarded)["errors"] == errors_before + 1
    # ... and still scores.
    ok, scores = call(guarded, "POST", "/v1/score", score_body(images(1, seed=3)), AUTH)
    assert ok == 200 and len(scores["reward"]) == 1


def test_other_methods_and_framing_errors(guarded):
    assert call(guarded, "GET", "/v1/score")[0] == 405
    assert call(guarded, "GET", "/nothing")[0] == 404
    # No Content-Length: 411, from a raw socket since http.client always sends one.
    with socket.create_connection(guarded.server_address[:2], timeout=5) as s:
        s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.0 411")
    # A client that announces more than it sends and hangs up: 400 or nothing, and the server lives on.
    with socket.create_connection(guarded.server_address[:2], timeout=5) as s:
        s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\nContent-Length: 100\r\n\r\n{")
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100).startswith(b"HTTP/1.0 400")
    assert_healthy(guarded)


def test_health_answers_while_the_reward_is_stuck_and_says_for_how_long():
    reward = Gated(ImageStatistic("brightness"))
    with serving(reward) as server:
        results, threads = _in_threads(server, [score_body(images(1))])
        wait_for(server, "jobs", 1)
        time.sleep(0.2)
        status, health = call(server, "GET", "/v1/health")
        assert status == 200 and health["busy_s"] >= 0.1, health
        reward.release.set()
        threads[0].join()
        assert results[0][0] == 200 and call(server, "GET", "/v1/health")[1]["busy_s"] == 0.0


def test_a_failing_request_does_not_fail_the_requests_merged_with_it():
    reward = Gated(Fragile())
    with serving(reward, name="fragile", max_batch=8, batch_wait_ms=0) as server:
        rest = [score_body(images(2, seed=i), ["ok", "ok"]) for i in range(3)] + [score_body(images(2), ["boom", "ok"])]
        results = _merged_behind_a_busy_reward(server, reward, score_body(images(1), ["ok"]), rest)
        m = metrics(server)
    assert [status for status, _ in results] == [200, 200, 200, 200, 500], results
    assert "reward 'fragile' failed" in results[4][1]["error"]["message"]
    assert m["max_requests_merged"] == 4, m  # they were merged, then isolated
