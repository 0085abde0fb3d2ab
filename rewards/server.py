"""Serve any steerflow `Reward` over HTTP with the protocol of `rewards/protocol.py`.

`make_server(reward, name, ...)` builds the server that `python -m launch.serve_reward` runs: handler
threads (one per connection, stdlib ``ThreadingHTTPServer``) check the token and the size, decode and
validate the body, look every image up in the dedup cache, and wait while a `Batcher`
(rewards/batching.py) scores the misses together with other requests'. Metrics are read at /v1/metrics.

A request never takes the server down: each failure is answered with its status and a message, and
a reward that raises fails only the requests whose images made it raise.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from rewards.batching import Batcher, Item, RewardFailed, ScoreCache, ServerMetrics, item_key
from rewards.protocol import (
    HEALTH_PATH, METRICS_PATH, PROTOCOL_VERSION, SCORE_PATH, SUPPORTED_VERSIONS, ProtocolError, ScoreRequest,
    decode_request, encode_scores, error_body,
)

log = logging.getLogger("steerflow.reward_server")
# How long an early rejection (401/413 sent before the body was read) keeps reading and discarding
# the body: closing a socket with unread data makes the kernel send a reset, which can destroy the
# answer before the client reads it.
DRAIN_SECONDS = 2.0


@dataclass
class ServerOptions:
    """Limits and knobs of one server (the CLI's values; see launch/serve_reward.py)."""

    max_batch: int = 64  # most images per reward call
    batch_wait_ms: float = 5.0  # most the batcher waits for requests still being received
    cache_size: int = 4096  # dedup cache entries (one per image); 0 disables deduplication entirely
    max_request_bytes: int = 64 * 2**20
    max_image_pixels: int = 4096 * 4096  # per image, checked before a PNG is decompressed
    token: str | None = None  # bearer token required on /v1/score when set
    request_timeout_s: float = 60.0  # socket timeout of a connection (a stalled client frees its thread)

    def check(self) -> None:
        problems = [f"{k} ({getattr(self, k)}) must be > 0" for k in
                    ("max_batch", "max_request_bytes", "max_image_pixels", "request_timeout_s") if getattr(self, k) <= 0]
        problems += [f"{k} ({getattr(self, k)}) must be >= 0" for k in ("batch_wait_ms", "cache_size") if getattr(self, k) < 0]
        if self.token is not None and not self.token:
            problems.append("token must be a non-empty string or null")
        if problems:
            raise ValueError("invalid reward server options: " + "; ".join(problems))


class RewardService:
    """Cache lookups and batching for one reward, independent of HTTP."""

    def __init__(self, reward, name: str, options: ServerOptions) -> None:
        options.check()
        self.reward, self.name, self.options = reward, name, options
        self.metrics = ServerMetrics()
        self.cache = ScoreCache(options.cache_size) if options.cache_size > 0 else None
        self._lock = threading.Lock()
        self._arriving = 0  # requests between their headers and their submission to the batcher
        self.batcher = Batcher(reward, name, options.max_batch, options.batch_wait_ms / 1000, self.metrics,
                               lambda: self._arriving > 0)
        self._started = time.monotonic()

    @contextmanager
    def arrival(self):
        """Count a request as arriving (the batcher may wait for it) until it calls the yielded
        ``done()`` or leaves the block, whichever comes first."""
        pending = [True]

        def done() -> None:
            with self._lock:
                if pending[0]:
                    pending[0] = False
                    self._arriving -= 1

        with self._lock:
            self._arriving += 1
        try:
            yield done
        finally:
            done()

    def score(self, request: ScoreRequest, submitted: Callable[[], None] = lambda: None) -> tuple[dict[str, list[float]], int]:
        """Scores of a decoded request as columns {"reward": [...], component: [...]} and its cache hits.

        ``submitted()`` is called once the request no longer needs the batcher to wait for it.
        Raises RewardFailed when the reward raises on these images.
        """
        n = len(request.prompts)
        metadata = request.metadata or [None] * n
        items = [Item(p, prompt, meta, item_key(p, prompt, meta) if self.cache is not None else None)
                 for p, prompt, meta in zip(request.pixels, request.prompts, metadata)]
        results = [self.cache.get(it.key) if self.cache is not None else None for it in items]
        misses = [i for i, r in enumerate(results) if r is None]
        hits = n - len(misses)
        self.metrics.add(images=n, cache_hits=hits)
        future = self.batcher.submit([items[i] for i in misses]) if misses else None
        submitted()
        if future is not None:
            for i, scores in zip(misses, future.result()):
                results[i] = scores
                if self.cache is not None:
                    self.cache.put(items[i].key, scores)
        names = list(dict.fromkeys(["reward", *(k for r in results for k in r)]))
        # A component some images lack (a reward may report it per prompt kind) is NaN for the others.
        columns = {k: [r.get(k, float("nan")) for r in results] for k in names}
        return columns, hits

    def health(self) -> dict:
        cls, busy = type(self.reward), self.batcher.busy_since
        return {
            "status": "ok", "version": PROTOCOL_VERSION, "versions": list(SUPPORTED_VERSIONS), "reward": self.name,
            "target": f"{cls.__module__}.{cls.__qualname__}", "input_kind": getattr(self.reward, "input_kind", None),
            "differentiable": getattr(self.reward, "differentiable", None), "max_batch": self.options.max_batch,
            "max_request_bytes": self.options.max_request_bytes, "max_image_pixels": self.options.max_image_pixels,
            "auth": self.options.token is not None, "uptime_s": round(time.monotonic() - self._started, 3),
            # How long the reward has been inside its current call: a growing number means it hangs.
            "busy_s": 0.0 if busy is None else round(time.monotonic() - busy, 3),
        }

    def close(self) -> None:
        self.batcher.close()


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    server_version = f"steerflow-reward/{PROTOCOL_VERSION}"
    # Headers and body leave in two writes; without TCP_NODELAY the second can wait for the
    # client's delayed ACK.
    disable_nagle_algorithm = True

    def setup(self) -> None:
        self.timeout = self.server.service.options.request_timeout_s
        super().setup()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        log.debug("%s %s", self.address_string(), format % args)

    # --- answers -------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)
        self.server.service.metrics.response(status, time.perf_counter() - self._t0)

    def _error(self, status: int, code: str, message: str, headers: dict | None = None) -> None:
        if status >= 500:
            log.warning("%s %s -> %d %s", self.command, self.path, status, message)
        self._send(status, error_body(status, code, message), headers)

    def _reject_unread(self, status: int, code: str, message: str, length: int, headers: dict | None = None) -> None:
        """Answer before reading the body, then read and discard it for a while (see DRAIN_SECONDS)."""
        self._error(status, code, message, headers)
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.5)
            deadline = time.monotonic() + DRAIN_SECONDS
            while length > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(length, 1 << 16))
                if not chunk:
                    break
                length -= len(chunk)
        except OSError:
            pass  # the client went away: nothing left to protect

    # --- endpoints -----------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._t0 = time.perf_counter()
        service = self.server.service
        service.metrics.add(requests=1)
        if self.path == HEALTH_PATH:
            self._send(200, json.dumps(service.health()).encode())
        elif self.path == METRICS_PATH:
            self._send(200, json.dumps(service.metrics.snapshot()).encode())
        elif self.path == SCORE_PATH:
            self._error(405, "method_not_allowed", f"use POST for {SCORE_PATH}", {"Allow": "POST"})
        else:
            self._error(404, "not_found", f"no endpoint {self.path!r}; have POST {SCORE_PATH}, GET {HEALTH_PATH}, "
                                          f"GET {METRICS_PATH}")

    def do_POST(self) -> None:  # noqa: N802
        self._t0 = time.perf_counter()
        service = self.server.service
        service.metrics.add(requests=1)
        try:
            self._score(service)
        except Exception as e:  # a bug here must cost one request, not the server
            log.exception("internal error on %s", self.path)
            try:
                self._error(500, "internal", f"internal server error: {type(e).__name__}: {e}")
            except OSError:
                pass

    def _score(self, service: RewardService) -> None:
        options = service.options
        raw_length = self.headers.get("Content-Length")
        try:
            length = int(raw_length) if raw_length is not None else None
        except ValueError:
            length = None
        if self.path != SCORE_PATH:
            return self._reject_unread(404, "not_found", f"no endpoint {self.path!r} for POST; use {SCORE_PATH}",
                                       length or 0)
        if options.token is not None:
            given = self.headers.get("Authorization", "")
            # compare_digest: the time taken must not reveal how much of the token matched.
            if not hmac.compare_digest(given.encode(), f"Bearer {options.token}".encode()):
                why = "missing" if not given else "wrong"
                return self._reject_unread(401, "unauthorized", f"{why} bearer token: send 'Authorization: Bearer <token>'",
                                           length or 0, {"WWW-Authenticate": "Bearer"})
        if raw_length is None:
            return self._reject_unread(411, "length_required", "Content-Length is required", 0)
        if length is None or length < 0:
            return self._reject_unread(400, "bad_request", f"Content-Length {raw_length!r} is not a byte count", 0)
        if length > options.max_request_bytes:
            return self._reject_unread(
                413, "too_large", f"request of {length} bytes exceeds this server's limit of {options.max_request_bytes} "
                                  "bytes; send fewer images per request", length)
        with service.arrival() as submitted:
            body = self.rfile.read(length)
            if len(body) != length:
                return self._error(400, "bad_request", f"body ended after {len(body)} of {length} bytes")
            try:
                request = decode_request(body, options.max_image_pixels)
            except ProtocolError as e:
                return self._error(e.status, e.code, str(e))
            try:
                columns, hits = service.score(request, submitted)
            except RewardFailed as e:
                return self._error(500, "reward_failed", str(e))
        self._send(200, encode_scores(service.name, columns, hits))


class RewardServer(ThreadingHTTPServer):
    """The HTTP server; ``service`` does the work. Handler threads are daemons: a stalled client
    never blocks shutdown."""

    daemon_threads = True

    def __init__(self, service: RewardService, host: str, port: int) -> None:
        self.service = service
        # IPv6 hosts need an AF_INET6 socket; the family is read by the base __init__.
        self.address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def start(self) -> threading.Thread:
        """Serve on a daemon thread (tests, benchmarks); stop with close()."""
        # A short poll interval: close() waits for the loop to notice, up to one interval.
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), name="reward-server", daemon=True)
        self._thread.start()
        return self._thread

    def close(self) -> None:
        """Stop the thread start() began (if any), release the port and stop the batcher."""
        thread = getattr(self, "_thread", None)
        if thread is not None:
            self.shutdown()
            thread.join()
            self._thread = None
        self.server_close()
        self.service.close()


def is_loopback(host: str) -> bool:
    """True iff every address ``host`` resolves to is a loopback address (127.0.0.0/8, ::1)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve host={host!r}: {e}") from e
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def make_server(reward, name: str, host: str = "127.0.0.1", port: int = 0, allow_remote: bool = False,
                options: ServerOptions | None = None) -> RewardServer:
    """A bound (not yet serving) server for ``reward``; ``port=0`` picks a free port (see ``.url``).

    Raises ValueError for a non-loopback ``host`` unless ``allow_remote`` (anyone who can reach the
    port can then use the reward's compute); warns when it is allowed, louder without a token.
    """
    options = options or ServerOptions()
    if not is_loopback(host):
        if not allow_remote:
            raise ValueError(f"host={host!r} is reachable from other machines; pass allow_remote=true to serve "
                             f"there on purpose (and set a token), or use host=127.0.0.1")
        warnings.warn(f"reward server {name!r} listens on {host!r}, reachable from other machines"
                      + ("" if options.token else " WITHOUT a token: anyone who reaches the port can use it"),
                      RuntimeWarning, stacklevel=2)
    service = RewardService(reward, name, options)
    try:
        return RewardServer(service, host, port)
    except BaseException:
        service.close()  # e.g. the port is taken: stop the batcher thread before re-raising
        raise
