"""A reward scored by a steerflow reward server (``python -m launch.serve_reward``), used like any other:
``+reward@rewards.pick=remote rewards.pick.url=http://127.0.0.1:8000``.

The reward model then lives in its own process, environment or machine (a GPU box, a conflicting
dependency set), and several training jobs can share one server and its dedup cache.
"""
from __future__ import annotations

import json
import math
import os
import warnings

import torch

from rewards.http_client import RequestError, request_json
from rewards.protocol import (
    HEALTH_PATH, IMAGE_FORMATS, PROTOCOL_VERSION, SCORE_PATH, ProtocolError, decode_scores, encode_image, encode_request,
    quantize,
)

FAILURE_POLICIES = ("fail", "skip")
# Bytes per image of a request beyond its base64 data (JSON punctuation, shape, the prompt's quoting);
# generous, so that a planned request never crosses the server's limit.
ENVELOPE_BYTES = 256


class RemoteReward:
    """Score with the reward served at ``url`` (the server's base, e.g. ``http://127.0.0.1:8000``).

    Images are sent quantised to 8 bits (``image_format``: "raw" arrays, larger but free to encode,
    or lossless "png", smaller on a slow network); the served reward scores them exactly as it
    would locally score ``images`` rounded to 8 bits. Requests hold at most ``batch_size`` images
    and stay under the server's ``max_request_bytes`` (read from /v1/health on the first call).

    timeout_s: per socket operation of each attempt (connect, each read), in seconds.
    retries, backoff_s: after a transient failure (connection refused or reset, timeout, HTTP 5xx,
      408/429), up to ``retries`` more attempts, waiting backoff_s, 2 backoff_s, 4 backoff_s, ...
    on_failure: what to do once a request's attempts are spent: "fail" raises RuntimeError naming
      the url and the cause; "skip" warns and scores that request's images NaN, which the trainer
      treats as "skip this update" on every rank. Permanent failures (any other 4xx: a malformed
      request, a wrong token, a protocol mismatch) always raise: retrying cannot cure them.
    token: bearer token of the server; when None, read from the environment variable ``token_env``
      if that is set (keeps the secret out of the run's saved config).
    Returns {"reward": float32 [B], <component>: float32 [B], ...} on images.device, components as
    the served reward reports them (NaN for those of a skipped request).
    """

    input_kind = "pixels"
    differentiable = False

    def __init__(self, url: str, timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 1.0,
                 on_failure: str = "fail", token: str | None = None, token_env: str | None = "STEERFLOW_REWARD_TOKEN",
                 image_format: str = "raw", batch_size: int = 64) -> None:
        problems = []
        if not url.startswith(("http://", "https://")):
            problems.append(f"url must start with http:// or https://, got {url!r}")
        if url.rstrip("/").endswith(SCORE_PATH):
            problems.append(f"url is the server's base ({url.rstrip('/')[: -len(SCORE_PATH)]!r}), without {SCORE_PATH}")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0 or batch_size < 1:
            problems.append(f"need timeout_s > 0 ({timeout_s}), retries >= 0 ({retries}), backoff_s >= 0 ({backoff_s}), "
                            f"batch_size >= 1 ({batch_size})")
        if on_failure not in FAILURE_POLICIES:
            problems.append(f"on_failure must be one of {FAILURE_POLICIES}, got {on_failure!r}")
        if image_format not in IMAGE_FORMATS:
            problems.append(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
        if problems:
            raise ValueError("RemoteReward: " + "; ".join(problems))
        self.url = url.rstrip("/")
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self.on_failure, self.image_format, self.batch_size = on_failure, image_format, int(batch_size)
        token = token if token is not None else (os.environ.get(token_env) if token_env else None)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._server: dict | None = None  # /v1/health, fetched once
        self._components: list[str] = []  # component names seen so far, for the NaN of a skipped request
        self.skipped_requests = 0

    def _request(self, path: str, payload: bytes | None = None) -> dict:
        return request_json(self.url + path, payload, headers=self._headers, timeout_s=self.timeout_s,
                            retries=self.retries, backoff_s=self.backoff_s)

    def _health(self) -> dict:
        if self._server is None:
            health = self._request(HEALTH_PATH)
            if PROTOCOL_VERSION not in health.get("versions", []):
                raise RuntimeError(f"reward server {self.url} speaks protocol versions {health.get('versions')}; this "
                                   f"client speaks {PROTOCOL_VERSION}: upgrade the older side")
            self._server = health
        return self._server

    def _plan(self, encoded: list[dict], prompts: list[str], metadata: list[dict] | None) -> list[range]:
        """Split the batch into requests of <= batch_size images and <= the server's byte limit."""
        limit = int(self._health()["max_request_bytes"])
        requests, start, size = [], 0, 0
        for i, image in enumerate(encoded):
            item = len(image["data"]) + len(json.dumps(prompts[i])) + ENVELOPE_BYTES
            try:
                item += len(json.dumps(metadata[i], allow_nan=False)) if metadata is not None else 0
            except (TypeError, ValueError) as e:
                raise ValueError(f"metadata[{i}] must be JSON-serialisable with finite numbers: {e}") from e
            if item + ENVELOPE_BYTES > limit:
                hint = " or use image_format=png" if self.image_format == "raw" else ""
                raise RuntimeError(f"one image ({item} bytes encoded) exceeds the limit of reward server {self.url} "
                                   f"({limit} bytes): raise its max_request_mb{hint}")
            if i > start and (i - start == self.batch_size or size + item + ENVELOPE_BYTES > limit):
                requests.append(range(start, i))
                start, size = i, 0
            size += item
        requests.append(range(start, len(encoded)))
        return requests

    def _failed(self, error: Exception, n: int) -> dict[str, torch.Tensor]:
        """The on_failure policy for a request of n images that could not be scored."""
        transient = isinstance(error, RequestError) and error.transient
        if self.on_failure == "fail" or not transient:
            raise RuntimeError(f"reward server {self.url}: {error}") from error
        self.skipped_requests += 1
        warnings.warn(f"reward server {self.url}: {error}; scoring {n} image(s) NaN (on_failure=skip, "
                      f"{self.skipped_requests} request(s) skipped so far)", RuntimeWarning, stacklevel=3)
        return {name: torch.full((n,), math.nan) for name in ["reward", *self._components]}

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> dict[str, torch.Tensor]:
        """Score images [B, 3, H, W] (float in [0, 1]) with their prompts (and JSON-able metadata dicts)."""
        if len(prompts) != images.shape[0] or (metadata is not None and len(metadata) != len(prompts)):
            raise ValueError(f"{images.shape[0]} images need as many prompts ({len(prompts)}) and metadata "
                             f"({None if metadata is None else len(metadata)})")
        pixels = quantize(images)
        encoded = [encode_image(p, self.image_format) for p in pixels]
        try:
            plan = self._plan(encoded, prompts, metadata)
        except RequestError as e:  # the server is not there (yet): every image shares the failure
            return {k: v.to(images.device) for k, v in self._failed(e, len(prompts)).items()}
        parts = []
        for rows in plan:
            meta = None if metadata is None else [metadata[i] for i in rows]
            body = encode_request(encoded[rows.start : rows.stop], prompts[rows.start : rows.stop], meta)
            try:
                scores = decode_scores(self._request(SCORE_PATH, body), len(rows))
            except RequestError as e:
                parts.append(self._failed(e, len(rows)))
                continue
            except ProtocolError as e:
                raise RuntimeError(f"reward server {self.url} answered outside the protocol: {e}") from e
            self._components += [k for k in scores if k != "reward" and k not in self._components]
            parts.append(scores)
        names = list(dict.fromkeys(k for part in parts for k in part))
        return {k: torch.cat([part.get(k, torch.full((len(part["reward"]),), math.nan)) for part in parts]).to(images.device)
                for k in names}
