"""The wire protocol of the steerflow reward server, version 1: what `rewards/server.py` accepts and
`rewards/remote.py` sends. JSON over HTTP/1.x, UTF-8, no pickle anywhere: a peer in any language can
speak it, and a malicious body can at worst be rejected.

Endpoints
  POST /v1/score     score a batch of images (below)
  GET  /v1/health    {"status": "ok", "versions": [1], "reward": name, "target": "module.Class",
                      "input_kind", "differentiable", "max_batch", "max_request_bytes",
                      "max_image_pixels", "auth": bool, "uptime_s", "busy_s": seconds the reward
                      has been in its current call}; never needs the token
  GET  /v1/metrics   counters since start-up (requests, responses by status, errors, images,
                      cache hits, batches, latency percentiles); never needs the token

Request (POST /v1/score; Content-Length required; ``Authorization: Bearer <token>`` when the
server was started with a token)::

  {
    "version": 1,                            required; see Versions
    "images": [IMAGE, ...],                  B images; sizes may differ between images
    "prompts": ["...", ...],                 B strings
    "metadata": [{...} | null, ...] | null   optional: B JSON objects handed to the reward as dicts
  }

  IMAGE is one of
    {"format": "png", "data": "<base64>"}    an 8-bit RGB PNG (PIL mode "RGB"); lossless
    {"format": "raw", "data": "<base64>", "shape": [H, W, 3], "dtype": "uint8"}
                                             H*W*3 bytes, row-major height x width x channel

Base64 is RFC 4648 section 4 with padding. A field not listed here is an error, so a typo is not
silently ignored. The reward receives float32 [B, 3, H, W] = uint8 / 255 (contiguous): exactly what
a local call gets for the same images quantised to 8 bits by `quantize` (clamp to [0, 1], x 255,
round half to even). Either format therefore scores bit for bit like the local reward on
``dequantize(quantize(images))`` in the same batch; when the server merges or splits requests
(see rewards/server.py), a reward whose kernels round differently by batch size may differ in the
last bits, exactly as it would locally with another batch size.

Response 200::

  {"version": 1, "reward_name": "brightness", "reward": [r_0, ..., r_{B-1}],
   "components": {"<name>": [c_0, ..., c_{B-1}], ...}, "cache_hits": k}

Scores are the reward's float32 values as JSON numbers; float32 -> float64 -> shortest repr -> float32
round-trips exactly. A non-finite score (NaN, +-inf) is written as null and read back as NaN.
``cache_hits`` counts the images answered from the server's dedup cache.

Errors: every non-2xx body is ``{"version": 1, "error": {"status": s, "code": "...", "message": "..."}}``
  400 bad_json | bad_request | unsupported_version   malformed input; the message names the field
  401 unauthorized         missing or wrong bearer token (with ``WWW-Authenticate: Bearer``)
  404 not_found, 405 method_not_allowed
  411 length_required      no Content-Length header
  413 too_large            body over the server's limit (``max_request_bytes`` in /v1/health)
  500 reward_failed        the reward raised; the message names the reward and the exception
  500 internal             a bug in the server itself
4xx are permanent (sending the same request again cannot succeed); 5xx and transport errors may be
transient, so clients retry those only.

Versions
  1: this document. A change an old peer would misread (a new required field, a changed meaning)
  bumps the version; a server lists what it accepts in /v1/health "versions" and answers 400
  unsupported_version to anything else.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)
SCORE_PATH = "/v1/score"
HEALTH_PATH = "/v1/health"
METRICS_PATH = "/v1/metrics"
IMAGE_FORMATS = ("png", "raw")
REQUEST_FIELDS = ("version", "images", "prompts", "metadata")
# zlib level 1: several times faster than PIL's default 6 and still lossless; the bytes only cross
# a network once, the encode happens for every image of every step.
PNG_COMPRESS_LEVEL = 1
_STRICT_BASE64 = sys.version_info >= (3, 11)  # binascii's strict_mode: rejects what b64decode(validate=True) does


class ProtocolError(ValueError):
    """A message that breaks the protocol. ``code`` and ``status`` are what the server answers with."""

    def __init__(self, message: str, code: str = "bad_request", status: int = 400):
        super().__init__(message)
        self.code, self.status = code, status


@dataclass
class ScoreRequest:
    """A decoded /v1/score request: B images as uint8 [H, W, 3] arrays, B prompts, B metadata dicts or None."""

    pixels: list[np.ndarray]
    prompts: list[str]
    metadata: list[dict] | None


def quantize(images: torch.Tensor) -> np.ndarray:
    """Float images [B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3] (clamped: decoders overshoot slightly)."""
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"images must be float [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    # Scale, round, clamp in place: the same bytes as clamp(0, 1) * 255 then round (a value outside
    # [0, 1] lands outside [0, 255] either way), with one temporary instead of four.
    pixels = images.detach().cpu().float().mul(255).round_().clamp_(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()


def dequantize(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> contiguous float32 [B, 3, H, W] = uint8 / 255: what the served reward receives."""
    # Transpose while still 1 byte per value, then one conversion and one in-place division.
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).contiguous().float().div_(255)


def png_bytes(pixels: np.ndarray) -> bytes:
    """One uint8 [H, W, 3] image as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def encode_image(pixels: np.ndarray, image_format: str) -> dict:
    """One uint8 [H, W, 3] image as an IMAGE object of the given format ("png" or "raw")."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must be uint8 [H, W, 3], got {pixels.dtype} {pixels.shape}")
    if image_format == "png":
        return {"format": "png", "data": base64.b64encode(png_bytes(pixels)).decode("ascii")}
    if image_format == "raw":
        data = base64.b64encode(np.ascontiguousarray(pixels).tobytes()).decode("ascii")
        return {"format": "raw", "data": data, "shape": list(pixels.shape), "dtype": "uint8"}
    raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")


def _b64(value, where: str) -> bytes:
    if not isinstance(value, str):
        raise ProtocolError(f"{where}.data must be a base64 string, got {type(value).__name__}")
    try:
        if _STRICT_BASE64:
            return binascii.a2b_base64(value, strict_mode=True)
        return base64.b64decode(value, validate=True)  # Python 3.10: a regex check, several times slower
    except (binascii.Error, ValueError) as e:
        raise ProtocolError(f"{where}.data is not valid base64: {e}") from None


def decode_image(obj, where: str, max_pixels: int) -> np.ndarray:
    """An IMAGE object -> uint8 [H, W, 3]; raises ProtocolError naming ``where`` (e.g. "images[3]")."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"{where} must be an object {{'format': ..., 'data': ...}}, got {type(obj).__name__}")
    fmt = obj.get("format")
    allowed = {"png": {"format", "data"}, "raw": {"format", "data", "shape", "dtype"}}.get(fmt)
    if allowed is None:
        raise ProtocolError(f"{where}.format must be one of {list(IMAGE_FORMATS)}, got {fmt!r}")
    extra, missing = sorted(set(obj) - allowed), sorted(allowed - set(obj))
    if extra or missing:
        raise ProtocolError(f"{where} ({fmt}) must have exactly the fields {sorted(allowed)}; missing {missing}, unknown {extra}")
    data = _b64(obj["data"], where)
    if fmt == "raw":
        shape, dtype = obj["shape"], obj["dtype"]
        if dtype != "uint8":
            raise ProtocolError(f"{where}.dtype must be 'uint8', got {dtype!r}")
        if (not isinstance(shape, list) or len(shape) != 3 or any(type(s) is not int or s < 1 for s in shape)
                or shape[2] != 3):
            raise ProtocolError(f"{where}.shape must be [H, W, 3] with positive integers, got {shape!r}")
        if shape[0] * shape[1] > max_pixels:
            raise ProtocolError(f"{where} has {shape[0]}x{shape[1]} pixels, over this server's max_image_pixels={max_pixels}")
        if len(data) != shape[0] * shape[1] * 3:
            raise ProtocolError(f"{where}: shape {shape} needs {shape[0] * shape[1] * 3} bytes, data has {len(data)}")
        return np.frombuffer(data, dtype=np.uint8).reshape(shape)
    try:
        # formats=["PNG"]: nothing but the PNG decoder ever sees these bytes.
        image = Image.open(io.BytesIO(data), formats=["PNG"])
        width, height = image.size  # from the header, before any pixel is decompressed
        if width * height > max_pixels:
            raise ProtocolError(f"{where} has {height}x{width} pixels, over this server's max_image_pixels={max_pixels}")
        if image.mode != "RGB":
            raise ProtocolError(f"{where} is a PNG of mode {image.mode!r}; the protocol carries 8-bit RGB only")
        image.load()
    except ProtocolError:
        raise
    except Exception as e:  # PIL raises many types for corrupt data; all mean the same to the caller
        raise ProtocolError(f"{where} is not a decodable PNG: {type(e).__name__}: {e}") from None
    return np.asarray(image, dtype=np.uint8)


def _reject_constant(name: str):
    raise ProtocolError(f"{name} is not JSON; send finite numbers or null", code="bad_json")


def _dumps(obj) -> bytes:
    # allow_nan=False: NaN/Infinity tokens are a Python extension other JSON parsers reject.
    return json.dumps(obj, allow_nan=False, separators=(",", ":")).encode("utf-8")


def encode_request(images: list[dict], prompts: list[str], metadata: list[dict] | None) -> bytes:
    """Body of a /v1/score request from IMAGE objects (see `encode_image`), prompts and metadata."""
    if len(prompts) != len(images) or (metadata is not None and len(metadata) != len(images)):
        raise ValueError(f"{len(images)} images need as many prompts (got {len(prompts)}) and metadata "
                         f"(got {None if metadata is None else len(metadata)})")
    body = {"version": PROTOCOL_VERSION, "images": images, "prompts": list(prompts), "metadata": metadata}
    try:
        return _dumps(body)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata must be JSON-serialisable with finite numbers: {e}") from e


def decode_request(body: bytes, max_pixels: int) -> ScoreRequest:
    """Parse and validate a /v1/score body; raises ProtocolError (400) naming the first bad field."""
    try:
        obj = json.loads(body, parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"body is not valid JSON: {e}", code="bad_json") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"body must be a JSON object, got {type(obj).__name__}")
    if "version" not in obj:
        raise ProtocolError(f"missing field 'version' (this server speaks {list(SUPPORTED_VERSIONS)})",
                            code="unsupported_version")
    if type(obj["version"]) is not int or obj["version"] not in SUPPORTED_VERSIONS:
        raise ProtocolError(f"protocol version {obj['version']!r} is not supported; this server speaks "
                            f"{list(SUPPORTED_VERSIONS)}", code="unsupported_version")
    unknown = sorted(set(obj) - set(REQUEST_FIELDS))
    if unknown:
        raise ProtocolError(f"unknown field(s) {unknown}; a version-1 request has {list(REQUEST_FIELDS)}")
    for field in ("images", "prompts"):
        if field not in obj:
            raise ProtocolError(f"missing field {field!r}")
        if not isinstance(obj[field], list):
            raise ProtocolError(f"{field!r} must be a list, got {type(obj[field]).__name__}")
    images, prompts, metadata = obj["images"], obj["prompts"], obj.get("metadata")
    if len(prompts) != len(images):
        raise ProtocolError(f"{len(images)} images but {len(prompts)} prompts; send one prompt per image")
    bad = next((i for i, p in enumerate(prompts) if not isinstance(p, str)), None)
    if bad is not None:
        raise ProtocolError(f"prompts[{bad}] must be a string, got {type(prompts[bad]).__name__}")
    if metadata is not None:
        if not isinstance(metadata, list) or len(metadata) != len(images):
            raise ProtocolError(f"metadata must be null or a list of {len(images)} objects, got {str(metadata)[:80]}")
        bad = next((i for i, m in enumerate(metadata) if m is not None and not isinstance(m, dict)), None)
        if bad is not None:
            raise ProtocolError(f"metadata[{bad}] must be an object or null, got {type(metadata[bad]).__name__}")
    pixels = [decode_image(image, f"images[{i}]", max_pixels) for i, image in enumerate(images)]
    return ScoreRequest(pixels, prompts, metadata)


def _to_json_floats(values) -> list:
    return [v if math.isfinite(v) else None for v in values]


def encode_scores(reward_name: str, columns: dict[str, list[float]], cache_hits: int) -> bytes:
    """Body of a 200 answer; ``columns`` holds "reward" and any components, each B floats."""
    components = {k: _to_json_floats(v) for k, v in columns.items() if k != "reward"}
    return _dumps({
        "version": PROTOCOL_VERSION, "reward_name": reward_name, "reward": _to_json_floats(columns["reward"]),
        "components": components, "cache_hits": cache_hits,
    })


def decode_scores(payload: dict, batch: int) -> dict[str, torch.Tensor]:
    """A parsed 200 answer -> {"reward": float32 [B], <component>: float32 [B]}; null becomes NaN.

    Raises ProtocolError if the answer is not a version-1 score for ``batch`` images.
    """
    if not isinstance(payload, dict) or payload.get("version") != PROTOCOL_VERSION:
        raise ProtocolError(f"the answer is not a version-{PROTOCOL_VERSION} score: {str(payload)[:200]}")
    columns = {"reward": payload.get("reward"), **(payload.get("components") or {})}
    out = {}
    for name, values in columns.items():
        if not isinstance(values, list) or len(values) != batch:
            raise ProtocolError(f"the answer's {name!r} holds {str(values)[:80]}, not {batch} scores")
        if not all(v is None or type(v) in (int, float) for v in values):
            raise ProtocolError(f"the answer's {name!r} holds non-numbers: {str(values)[:80]}")
        out[name] = torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)
    return out


def error_body(status: int, code: str, message: str) -> bytes:
    """Body of a non-2xx answer."""
    return _dumps({"version": PROTOCOL_VERSION, "error": {"status": status, "code": code, "message": message}})
