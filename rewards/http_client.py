"""JSON over HTTP with a timeout, retries and exponential backoff: the transport of the rewards
that score on another server (`rewards/remote.py`, `rewards/vlm_judge.py`).

Standard library only (``http.client``): no proxy variables are consulted, so a loopback reward
server is reached directly even where ``http_proxy`` is set for the outside world.
"""
from __future__ import annotations

import http.client
import json
import time
from urllib.parse import urlsplit

# Statuses that may succeed on a later try: timeouts, rate limits, server-side failures and overload.
# Every other 4xx is permanent (a malformed request, a wrong token, a wrong URL).
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class RequestError(RuntimeError):
    """A request that did not succeed. ``transient``: it failed only for reasons a retry could cure
    (transport errors, timeouts, RETRYABLE_STATUS) and ran out of attempts; ``status``: the last
    HTTP status, None when no answer came."""

    def __init__(self, message: str, status: int | None, transient: bool):
        super().__init__(message)
        self.status, self.transient = status, transient


def _error_text(body: bytes) -> str:
    """The server's message: the protocol's {"error": {"message"}} or OpenAI's {"error": {"message"}}, else the text."""
    try:
        error = json.loads(body)["error"]
        return str(error.get("message", error)) if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        return body[:300].decode("utf-8", "replace").strip() or "(empty body)"


def _once(method: str, url: str, payload: bytes | None, headers: dict, timeout_s: float) -> tuple[int, bytes]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"url must be http(s)://host[:port]/path, got {url!r}")
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parts.hostname, parts.port, timeout=timeout_s)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        try:
            connection.request(method, path, body=payload, headers=headers)
        except (BrokenPipeError, ConnectionResetError):
            # A server may answer (401, 413) and stop reading before the whole body is sent; its
            # answer is then waiting to be read. If it is not, getresponse raises the transport error.
            pass
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def request_json(url: str, payload: bytes | None = None, *, headers: dict | None = None, timeout_s: float,
                 retries: int = 0, backoff_s: float = 0.0) -> dict:
    """POST ``payload`` (JSON bytes) to ``url``, or GET it when payload is None; return the parsed 200 answer.

    timeout_s bounds each socket operation (connecting, each read), so a server that stalls costs
    at most about timeout_s per attempt. Up to ``retries`` more attempts follow a transient failure,
    after backoff_s, 2 backoff_s, 4 backoff_s, ... seconds.
    Raises RequestError naming the method, the url and the cause: at once for a permanent 4xx,
    after the last attempt otherwise.
    """
    method = "GET" if payload is None else "POST"
    headers = {"Accept": "application/json", **({"Content-Type": "application/json"} if payload is not None else {}),
               **(headers or {})}
    attempts, status, cause = retries + 1, None, ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            status, body = _once(method, url, payload, headers, timeout_s)
        except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, malformed answer
            status, cause = None, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            continue
        if status == 200:
            try:
                return json.loads(body)
            except ValueError as e:
                cause = f"the 200 answer is not JSON ({e}): {body[:200]!r}"
                continue
        cause = f"HTTP {status}: {_error_text(body)}"
        if status not in RETRYABLE_STATUS:
            raise RequestError(f"{method} {url} -> {cause}", status, transient=False)
    raise RequestError(f"{method} {url} failed after {attempts} attempt(s) (timeout {timeout_s:g} s each): {cause}",
                       status, transient=True)
