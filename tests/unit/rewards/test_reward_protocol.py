"""The reward server's wire format (rewards/protocol.py): images and scores survive the round trip
exactly, and malformed messages are rejected with the field named."""
from __future__ import annotations

import base64
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from rewards.protocol import (
    ProtocolError, decode_request, decode_scores, dequantize, encode_image, encode_request, encode_scores, quantize,
)

MAX_PIXELS = 64 * 64


def pixels(n: int = 3, h: int = 5, w: int = 7, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def test_quantize_rounds_clamps_and_inverts_dequantize():
    images = torch.tensor([-0.1, 0.0, 0.5 / 255, 1.5 / 255, 0.5, 1.0, 1.2]).reshape(1, 1, 7, 1).expand(1, 3, 7, 1)
    assert quantize(images)[0, :, 0, 0].tolist() == [0, 0, 0, 2, 128, 255, 255]  # half to even, clamped
    p = pixels()
    images = dequantize(p)
    assert images.shape == (3, 3, 5, 7) and images.dtype == torch.float32 and images.is_contiguous()
    assert np.array_equal(quantize(images), p)
    torch.testing.assert_close(images, torch.from_numpy(p).permute(0, 3, 1, 2).float() / 255, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["raw", "png"])
def test_images_round_trip_exactly(fmt):
    p = pixels()
    body = encode_request([encode_image(x, fmt) for x in p], ["a", "b", "c"], [{"k": 1}, None, {}])
    request = decode_request(body, MAX_PIXELS)
    assert np.array_equal(np.stack(request.pixels), p)
    assert request.prompts == ["a", "b", "c"] and request.metadata == [{"k": 1}, None, {}]


def test_scores_round_trip_bit_for_bit_and_non_finite_becomes_null():
    values = torch.tensor([0.1, 1 / 3, -2.5e-8, 3.4e38, math.nan, math.inf], dtype=torch.float32)
    body = encode_scores("r", {"reward": values.tolist(), "part": values.flip(0).tolist()}, cache_hits=2)
    text = body.decode()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON for any peer
    payload = json.loads(text)
    assert payload["reward"][4:] == [None, None] and payload["cache_hits"] == 2
    out = decode_scores(payload, 6)
    assert torch.equal(out["reward"][:4], values[:4]) and torch.isnan(out["reward"][4:]).all()
    assert torch.equal(out["part"][2:], values.flip(0)[2:]) and out["reward"].dtype == torch.float32


@pytest.mark.parametrize("payload, match", [
    ({"version": 2, "reward": [1.0], "components": {}}, "version-1"),
    ({"version": 1, "reward": [1.0, 2.0], "components": {}}, "not 1 scores"),
    ({"version": 1, "reward": ["1.0"], "components": {}}, "non-numbers"),
    ({"version": 1, "reward": [1.0], "components": {"x": []}}, "'x'"),
])
def test_malformed_answers_are_rejected(payload, match):
    with pytest.raises(ProtocolError, match=match):
        decode_scores(payload, 1)


def _body(**fields) -> bytes:
    p = pixels(1, 4, 4)[0]
    base = {"version": 1, "images": [encode_image(p, "raw")], "prompts": ["a"], "metadata": None}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


def _png(mode: str, size=(4, 4), fmt="PNG") -> str:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


RAW = {"format": "raw", "dtype": "uint8"}
BAD_REQUESTS = {
    "not json": (b"{oops", "not valid JSON"),
    "nan token": (b'{"version": 1, "images": [], "prompts": [], "metadata": [NaN]}', "NaN is not JSON"),
    "not an object": (b"[1, 2]", "JSON object"),
    "no version": (_body(version=...), "missing field 'version'"),
    "version 2": (_body(version=2), "version 2 is not supported"),
    "version as string": (_body(version="1"), "version '1' is not supported"),
    "unknown field": (_body(prompt="a"), r"unknown field\(s\) \['prompt'\]"),
    "no prompts": (_body(prompts=...), "missing field 'prompts'"),
    "prompts count": (_body(prompts=["a", "b"]), "1 images but 2 prompts"),
    "prompt type": (_body(prompts=[3]), r"prompts\[0\] must be a string"),
    "metadata count": (_body(metadata=[{}, {}]), "metadata must be null or a list of 1"),
    "metadata type": (_body(metadata=["x"]), r"metadata\[0\] must be an object"),
    "image not object": (_body(images=["abc"]), r"images\[0\] must be an object"),
    "bad format": (_body(images=[{"format": "jpeg", "data": ""}]), r"images\[0\].format must be one of"),
    "bad base64": (_body(images=[{**RAW, "data": "@@@", "shape": [1, 1, 3]}]), "not valid base64"),
    "raw short": (_body(images=[{**RAW, "data": "AAAA", "shape": [2, 2, 3]}]), "needs 12 bytes, data has 3"),
    "raw 4 channels": (_body(images=[{**RAW, "data": "AAAA", "shape": [1, 1, 4]}]), r"must be \[H, W, 3\]"),
    "raw 2-d": (_body(images=[{**RAW, "data": "AAAA", "shape": [1, 3]}]), r"must be \[H, W, 3\]"),
    "raw float dtype": (_body(images=[{**RAW, "dtype": "float32", "data": "AAAA", "shape": [1, 1, 3]}]), "dtype must be 'uint8'"),
    "raw missing shape": (_body(images=[{"format": "raw", "data": "AAAA", "dtype": "uint8"}]), r"missing \['shape'\]"),
    "raw too many pixels": (_body(images=[{**RAW, "data": "", "shape": [65, 64, 3]}]), "max_image_pixels"),
    "png of a jpeg": (_body(images=[{"format": "png", "data": _png("RGB", fmt="JPEG")}]), "not a decodable PNG"),
    "png grey": (_body(images=[{"format": "png", "data": _png("L")}]), "mode 'L'"),
    "png too many pixels": (_body(images=[{"format": "png", "data": _png("RGB", (65, 64))}]), "max_image_pixels"),
    "png truncated": (_body(images=[{"format": "png", "data": _png("RGB")[:40]}]), "not a decodable PNG"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_malformed_requests_name_the_problem(case):
    body, match = BAD_REQUESTS[case]
    with pytest.raises(ProtocolError, match=match) as info:
        decode_request(body, MAX_PIXELS)
    assert info.value.status == 400


def test_the_request_encoder_refuses_what_it_cannot_send():
    p = encode_image(pixels(1)[0], "raw")
    with pytest.raises(ValueError, match="finite"):
        encode_request([p], ["a"], [{"x": math.nan}])
    with pytest.raises(ValueError, match="as many prompts"):
        encode_request([p], ["a", "b"], None)
    with pytest.raises(ValueError, match="image_format"):
        encode_image(pixels(1)[0], "jpeg")
