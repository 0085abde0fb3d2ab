"""RemoteReward, the client of the reward server: exact scores, request planning under the
server's limits, and the failure policy (retries with backoff, then fail or skip) when the server
is absent, stalls, dies or errs."""
from __future__ import annotations

import math
import socket
import threading
import time
from contextlib import contextmanager

import pytest
import torch

from rewards.image_stats import ImageStatistic
from rewards.protocol import dequantize, quantize
from rewards.remote import RemoteReward
from rewards.server import ServerOptions, make_server


def images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@contextmanager
def serving(reward, **options):
    server = make_server(reward, "probe", options=ServerOptions(**options))
    server.start()
    try:
        yield server
    finally:
        server.close()


def metrics(server) -> dict:
    return server.service.metrics.snapshot()


def closed_port_url() -> str:
    """A loopback URL where nothing listens (the port was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@contextmanager
def stalling_server():
    """Accepts connections and reads requests but never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    held, stop = [], threading.Event()

    def accept() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for s in held:
            s.close()
        listener.close()


BRIGHTNESS = ImageStatistic("brightness")


@pytest.mark.parametrize("fmt", ["raw", "png"])
def test_scores_equal_the_local_reward_on_8_bit_images_bit_for_bit(fmt):
    x = images(6)
    with serving(BRIGHTNESS) as server:
        out = RemoteReward(server.url, image_format=fmt)(x, [""] * 6)
    expected = BRIGHTNESS(dequantize(quantize(x)), [""] * 6)
    assert set(out) == {"reward", "brightness"}
    for key in out:
        assert out[key].dtype == torch.float32 and torch.equal(out[key], expected[key]), key


class MetadataEcho:
    """reward = metadata["value"] (JSON in, float32 out)."""

    input_kind, differentiable = "pixels", False

    def __call__(self, images, prompts, metadata=None):
        return {"reward": torch.tensor([m["value"] for m in metadata]), "prompt_len": torch.tensor([len(p) for p in prompts])}


def test_prompts_and_metadata_reach_the_reward():
    with serving(MetadataEcho()) as server:
        reward = RemoteReward(server.url)
        out = reward(images(2), ["ab", "abcd"], [{"value": 0.25}, {"value": -3.0}])
        with pytest.raises(ValueError, match=r"metadata\[1\] must be JSON-serialisable"):
            reward(images(2), ["ab", "abcd"], [{"value": 0.25}, {"value": math.nan}])
    assert out["reward"].tolist() == [0.25, -3.0] and out["prompt_len"].tolist() == [2.0, 4.0]


def test_requests_follow_batch_size_and_the_servers_byte_limit():
    x = images(7, size=32)  # 32*32*3 bytes -> ~4 KiB of base64 per raw image
    with serving(BRIGHTNESS, batch_wait_ms=0) as server:
        out = RemoteReward(server.url, batch_size=3)(x, [""] * 7)
        assert metrics(server)["rounds"] == 3  # 3 + 3 + 1 images
    with serving(BRIGHTNESS, batch_wait_ms=0, max_request_bytes=10_000) as server:
        split = RemoteReward(server.url, batch_size=64)(x, [""] * 7)
        m = metrics(server)
        assert m["rounds"] == 4 and m["responses"].get("413") is None, m  # 2 images per request fit in 10 kB
    expected = BRIGHTNESS(dequantize(quantize(x)), [""] * 7)["reward"]
    assert torch.equal(out["reward"], expected) and torch.equal(split["reward"], expected)
    with serving(BRIGHTNESS, max_request_bytes=2_000) as server:
        with pytest.raises(RuntimeError, match="one image .* exceeds the limit"):
            RemoteReward(server.url)(x, [""] * 7)


def test_unreachable_server_is_retried_with_backoff_then_fails_naming_url_and_cause():
    url = closed_port_url()
    reward = RemoteReward(url, retries=2, backoff_s=0.1, timeout_s=1)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=rf"{url}.*3 attempt\(s\).*Connection ?Refused") as info:
        reward(images(2), ["", ""])
    assert time.perf_counter() - t0 >= 0.3  # waited 0.1 + 0.2 s between the attempts
    assert url in str(info.value)


def test_skip_scores_the_batch_nan_with_a_warning():
    reward = RemoteReward(closed_port_url(), retries=1, backoff_s=0.01, on_failure="skip")
    with pytest.warns(RuntimeWarning, match="NaN.*on_failure=skip"):
        out = reward(images(3), [""] * 3)
    assert torch.isnan(out["reward"]).all() and out["reward"].shape == (3,) and reward.skipped_requests == 1


def test_a_stalled_server_times_out_instead_of_hanging():
    with stalling_server() as url:
        reward = RemoteReward(url, timeout_s=0.2, retries=1, backoff_s=0.01)
        t0 = time.perf_counter()
        with pytest.raises(RuntimeError, match="2 attempt.*timed out"):
            reward(images(2), ["", ""])
        assert time.perf_counter() - t0 < 2


def test_a_server_that_dies_mid_run_gives_nan_with_the_same_components_or_fails():
    x = images(2)
    server = make_server(BRIGHTNESS, "brightness")
    server.start()
    skip = RemoteReward(server.url, retries=1, backoff_s=0.01, on_failure="skip")
    fail = RemoteReward(server.url, retries=1, backoff_s=0.01)
    assert not torch.isnan(skip(x, ["", ""])["reward"]).any() and not torch.isnan(fail(x, ["", ""])["reward"]).any()
    server.close()
    with pytest.warns(RuntimeWarning):
        out = skip(x, ["", ""])
    # Same keys as before (the trainer gathers metrics by key across ranks), all NaN.
    assert set(out) == {"reward", "brightness"} and all(torch.isnan(v).all() for v in out.values())
    with pytest.raises(RuntimeError, match=f"reward server {server.url}.*2 attempt"):
        fail(x, ["", ""])


class FailsFirst:
    """Brightness, but raises on its first `n` calls (a transient fault: OOM, a lost device)."""

    input_kind, differentiable = "pixels", False

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self, images, prompts, metadata=None):
        self.calls += 1
        if self.calls <= self.n:
            raise RuntimeError("CUDA out of memory (pretend)")
        return images.mean(dim=(1, 2, 3))


def test_a_reward_error_is_retried_and_not_cached():
    reward = FailsFirst(2)
    with serving(reward) as server:
        out = RemoteReward(server.url, retries=2, backoff_s=0.01)(images(2), ["", ""])
        assert metrics(server)["responses"]["500"] == 2
    assert reward.calls == 3 and torch.isfinite(out["reward"]).all()
    with serving(FailsFirst(5)) as server:
        with pytest.raises(RuntimeError, match="HTTP 500: reward 'probe' failed .* CUDA out of memory"):
            RemoteReward(server.url, retries=1, backoff_s=0.01)(images(2), ["", ""])


def test_token_from_the_environment_and_permanent_errors_are_never_skipped(monkeypatch):
    with serving(BRIGHTNESS, token="t0k") as server:
        monkeypatch.setenv("STEERFLOW_REWARD_TOKEN", "t0k")
        assert torch.isfinite(RemoteReward(server.url)(images(1), [""])["reward"]).all()
        monkeypatch.delenv("STEERFLOW_REWARD_TOKEN")
        anonymous = RemoteReward(server.url, retries=3, backoff_s=1.0, on_failure="skip")
        t0 = time.perf_counter()
        with pytest.raises(RuntimeError, match="HTTP 401: missing bearer token"):
            anonymous(images(1), [""])
        assert time.perf_counter() - t0 < 0.5  # no retries, no backoff: a 401 cannot heal


def test_protocol_version_mismatch_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("rewards.server.SUPPORTED_VERSIONS", (2,))
    with serving(BRIGHTNESS) as server:
        with pytest.raises(RuntimeError, match=r"speaks protocol versions \[2\]; this client speaks 1"):
            RemoteReward(server.url)(images(1), [""])


@pytest.mark.parametrize("kwargs, match", [
    ({"url": "127.0.0.1:8000"}, "http://"),
    ({"url": "http://127.0.0.1:8000/v1/score"}, "without /v1/score"),
    ({"on_failure": "ignore"}, "on_failure"),
    ({"image_format": "jpeg"}, "image_format"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_configuration_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RemoteReward(**{"url": "http://127.0.0.1:8000", **kwargs})


def test_nan_scores_cross_the_wire():
    class Gappy:
        input_kind, differentiable = "pixels", False

        def __call__(self, images, prompts, metadata=None):
            return torch.tensor([0.5, math.nan, math.inf])

    with serving(Gappy()) as server:
        out = RemoteReward(server.url)(images(3), [""] * 3)
    assert out["reward"][0] == 0.5 and torch.isnan(out["reward"][1:]).all()
