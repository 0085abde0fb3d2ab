"""Batching, deduplication and bookkeeping for a served reward (the HTTP side is rewards/server.py).

`Batcher` owns the reward on one thread: it takes every queued request (up to ``max_batch`` images),
waits up to ``wait_s`` for requests still being received, scores identical images once, calls the
reward on images of the same size together and hands each request its scores. Requests that arrive
while the reward runs queue up and form the next batch, so concurrent clients share batches and a
lone client never waits for company. One thread means the reward is never called concurrently (GPU
models and non-thread-safe libraries need no locking). A merged batch that fails is retried request
by request, so one request's bad input fails only that request.
"""
from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from rewards.protocol import dequantize

log = logging.getLogger("steerflow.reward_server")
LATENCY_WINDOW = 1024  # requests kept for the latency percentiles
POLL_S = 0.0005  # how often the batcher looks for a request that is still being received


class RewardFailed(RuntimeError):
    """The served reward raised; the message names it and the exception."""


class ServerMetrics:
    """Thread-safe counters for /v1/metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._counts = dict.fromkeys(
            ("requests", "errors", "images", "images_scored", "cache_hits", "dedup_hits", "jobs", "batches", "rounds",
             "merged_rounds", "max_requests_merged", "max_batch_images"), 0)
        self._reward_s = 0.0
        self._status: dict[str, int] = {}
        self._latency: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, value in counts.items():
                self._counts[key] += value

    def batch(self, images: int, seconds: float) -> None:
        with self._lock:
            self._counts["batches"] += 1
            self._counts["images_scored"] += images
            self._counts["max_batch_images"] = max(self._counts["max_batch_images"], images)
            self._reward_s += seconds

    def round(self, requests: int) -> None:
        with self._lock:
            self._counts["rounds"] += 1
            self._counts["merged_rounds"] += requests > 1
            self._counts["max_requests_merged"] = max(self._counts["max_requests_merged"], requests)

    def response(self, status: int, seconds: float) -> None:
        with self._lock:
            self._status[str(status)] = self._status.get(str(status), 0) + 1
            self._counts["errors"] += status >= 400
            self._latency.append(seconds)

    def snapshot(self) -> dict:
        with self._lock:
            latency = sorted(self._latency)
            out = dict(self._counts, responses=dict(self._status), reward_s=round(self._reward_s, 6),
                       uptime_s=round(time.monotonic() - self._start, 3))

        def pct(q: float) -> float:
            return round(1000 * latency[min(len(latency) - 1, int(q * len(latency)))], 3)

        out["latency_ms"] = ({"count": len(latency), "mean": round(1000 * sum(latency) / len(latency), 3),
                              "p50": pct(0.5), "p95": pct(0.95), "max": pct(1.0)} if latency else {"count": 0})
        return out


class ScoreCache:
    """LRU map from an image key to its scores {name: float}; thread-safe."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, dict[str, float]] = OrderedDict()

    def get(self, key: bytes) -> dict[str, float] | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: bytes, value: dict[str, float]) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def item_key(pixels: np.ndarray, prompt: str, metadata: dict | None) -> bytes:
    """Identity of one scoring input: SHA-256 over shape, pixels, prompt and canonical metadata JSON.

    Every field is length-prefixed, so no two different inputs concatenate to the same bytes.
    """
    h = hashlib.sha256()
    for part in (repr(pixels.shape).encode(), np.ascontiguousarray(pixels).data, prompt.encode("utf-8"),
                 json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode("utf-8")):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


def score_columns(out, batch: int, name: str) -> dict[str, list[float]]:
    """A reward's answer (tensor [B] or dict with "reward") -> {"reward": B floats, component: B floats}."""
    if not isinstance(out, dict):
        out = {"reward": out}
    if "reward" not in out:
        raise RuntimeError(f"reward {name!r} returned a dict without 'reward' (keys {sorted(out)})")
    columns = {}
    for key, value in out.items():
        value = torch.as_tensor(value).detach().float().reshape(-1).cpu()
        if value.numel() != batch:
            raise RuntimeError(f"reward {name!r} returned {value.numel()} values for {key!r} on a batch of {batch}")
        columns[key] = value.tolist()  # float32 -> exact Python floats
    return columns


@dataclass
class Item:
    """One image to score, with its prompt, metadata and dedup key."""

    pixels: np.ndarray
    prompt: str
    metadata: dict | None
    key: bytes | None  # None: deduplication is off


@dataclass
class Job:
    """The cache misses of one request and the future its handler waits on."""

    items: list[Item]
    future: Future


_STOP = object()


class Batcher:
    """Owns the reward: merges queued jobs into batches and scores them on one thread."""

    def __init__(self, reward, name: str, max_batch: int, wait_s: float, metrics: ServerMetrics,
                 arriving: Callable[[], bool] = lambda: False) -> None:
        """``arriving()``: whether requests are being received that will be submitted soon."""
        self.reward, self.name, self.max_batch, self.wait_s, self.metrics = reward, name, max_batch, wait_s, metrics
        self.arriving = arriving
        self.busy_since: float | None = None  # time.monotonic() when the running reward call began
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"reward-batcher-{name}", daemon=True)
        self._thread.start()

    def submit(self, items: list[Item]) -> Future:
        """Queue items; the future resolves to one {name: float} per item, or raises RewardFailed."""
        job = Job(items, Future())
        self.metrics.add(jobs=1)
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        carry = None
        while True:
            first = carry if carry is not None else self._queue.get()
            if first is _STOP:
                return
            jobs, carry = self._collect(first)
            self.metrics.round(len(jobs))
            self._score_jobs(jobs)

    def _collect(self, first: Job) -> tuple[list[Job], object]:
        """``first`` plus the queued jobs, and those submitted within wait_s while requests are still
        arriving, as long as the total stays <= max_batch images; returns them and the job (or _STOP)
        that must start the next round."""
        jobs, images = [first], len(first.items)
        deadline = time.monotonic() + self.wait_s
        while images < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                if not self.arriving() or time.monotonic() >= deadline:
                    break
                # Short polls rather than one long get: the arrival may end in an error instead.
                try:
                    job = self._queue.get(timeout=min(POLL_S, max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    continue
            if job is _STOP or images + len(job.items) > self.max_batch:
                return jobs, job
            jobs.append(job)
            images += len(job.items)
        return jobs, None

    def _score_jobs(self, jobs: list[Job]) -> None:
        try:
            scores = self._score_items([item for job in jobs for item in job.items])
        except BaseException as e:  # even SystemExit from a reward: this thread must outlive it
            self.busy_since = None
            if len(jobs) > 1:
                # One request's images (say, a prompt the reward cannot parse) must not fail the
                # others merged with it: score each request alone to find out whose it was.
                for job in jobs:
                    self._score_jobs([job])
                return
            n = len(jobs[0].items)
            log.warning("reward %r failed on a batch of %d: %s: %s", self.name, n, type(e).__name__, e)
            jobs[0].future.set_exception(RewardFailed(f"reward {self.name!r} failed on a batch of {n} image(s): "
                                                      f"{type(e).__name__}: {e}"))
            return
        start = 0
        for job in jobs:
            job.future.set_result(scores[start : start + len(job.items)])
            start += len(job.items)

    def _score_items(self, items: list[Item]) -> list[dict[str, float]]:
        first_of: dict[bytes, int] = {}  # key -> index of its first occurrence, which gets scored
        todo: list[int] = []
        for i, item in enumerate(items):
            if item.key is None or item.key not in first_of:
                if item.key is not None:
                    first_of[item.key] = i
                todo.append(i)
        self.metrics.add(dedup_hits=len(items) - len(todo))
        by_shape: dict[tuple, list[int]] = {}
        for i in todo:
            by_shape.setdefault(items[i].pixels.shape, []).append(i)
        scores: list[dict[str, float] | None] = [None] * len(items)
        for indices in by_shape.values():
            for start in range(0, len(indices), self.max_batch):
                chunk = indices[start : start + self.max_batch]
                images = dequantize(np.stack([items[i].pixels for i in chunk]))
                prompts = [items[i].prompt for i in chunk]
                metadata = None if all(items[i].metadata is None for i in chunk) else [items[i].metadata or {} for i in chunk]
                t0 = time.perf_counter()
                self.busy_since = time.monotonic()
                out = self.reward(images, prompts, metadata)
                self.busy_since = None
                columns = score_columns(out, len(chunk), self.name)
                self.metrics.batch(len(chunk), time.perf_counter() - t0)
                for j, i in enumerate(chunk):
                    scores[i] = {key: values[j] for key, values in columns.items()}
        for i, item in enumerate(items):
            if scores[i] is None:
                scores[i] = scores[first_of[item.key]]
        return scores
