"""Open Inference Protocol v2 request decoding: JSON tensors and the binary tensor data extension.

Accepted input: one tensor named ``images``, either UINT8 of shape [B, S, S, 3] (NHWC RGB at the
model's input size) or BYTES of shape [B] holding encoded JPEG/PNG/BMP images (base64 strings in
JSON, or raw bytes through the binary extension's ``binary_data_size``).

Outputs: every model gives ``probs``, ``features``, ``verdict`` and ``defect_type``; an anomaly
model also ``score`` and ``anomaly_map``. A request that names no outputs gets all of them except
the map, which is S × S numbers per image in JSON: a client asks for it by name.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kensa.serving.errors import ApiError

INPUT_NAME = "images"
OUTPUTS = ("probs", "features", "verdict", "defect_type")
ANOMALY_OUTPUTS = ("score", "anomaly_map")
MAP_OUTPUT = "anomaly_map"
MAX_IMAGES = 64


def model_outputs(is_anomaly: bool) -> tuple[str, ...]:
    """The outputs a request may name for a model of this kind."""
    return OUTPUTS + ANOMALY_OUTPUTS if is_anomaly else OUTPUTS


def bad(detail: str) -> ApiError:
    return ApiError(400, "bad_request", detail)


@dataclass
class V2Request:
    """A decoded infer request: images as encoded bytes or as a uint8 tensor, and its options."""

    id: str | None
    encoded: list[bytes] | None = None
    tensor: np.ndarray | None = None  # (B, S, S, 3) uint8
    outputs: list[str] = field(default_factory=lambda: list(OUTPUTS))
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.encoded) if self.encoded is not None else int(self.tensor.shape[0])  # type: ignore[union-attr]


def _split_binary(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise bad("Inference-Header-Content-Length must be an integer") from None
    if not 0 < n <= len(body):
        raise bad(f"Inference-Header-Content-Length {n} is outside the body of {len(body)} bytes")
    return body[:n], body[n:]


def _shape(spec: dict[str, Any]) -> list[int]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise bad("input 'shape' must be a list of non-negative integers")
    return shape


def _binary_size(spec: dict[str, Any]) -> int | None:
    params = spec.get("parameters") or {}
    if not isinstance(params, dict) or "binary_data_size" not in params:
        return None
    size = params["binary_data_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise bad("parameters.binary_data_size must be a non-negative integer")
    return size


def _bytes_elements(blob: bytes) -> list[bytes]:
    # Binary BYTES tensors: each element is a 4-byte little-endian length, then the bytes.
    out, pos = [], 0
    while pos < len(blob):
        if pos + 4 > len(blob):
            raise bad("binary BYTES data ends inside an element's length prefix")
        (n,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        if pos + n > len(blob):
            raise bad("binary BYTES data ends inside an element")
        out.append(blob[pos : pos + n])
        pos += n
    return out


def _uint8_tensor(spec: dict[str, Any], shape: list[int], size: int, blob: bytes | None) -> np.ndarray:
    expected = f"[B, {size}, {size}, 3] with 1 ≤ B ≤ {MAX_IMAGES}"
    if len(shape) != 4 or shape[1:] != [size, size, 3] or not 1 <= shape[0] <= MAX_IMAGES:
        raise bad(f"input 'images' of datatype UINT8 has shape {shape}; expected {expected} (NHWC RGB)")
    count = int(np.prod(shape))
    if blob is not None:
        if len(blob) != count:
            raise bad(f"binary data has {len(blob)} bytes; shape {shape} needs {count}")
        return np.frombuffer(blob, dtype=np.uint8).reshape(shape)
    data = spec.get("data")
    if not isinstance(data, list):
        raise bad("input 'images' needs 'data' (a flat or nested list of integers 0–255)")
    try:
        arr = np.asarray(data, dtype=np.int64)
    except (ValueError, TypeError, OverflowError):
        raise bad("input 'images' data must be integers 0–255 (flat or nested like the shape)") from None
    if arr.size != count:
        raise bad(f"input 'images' has {arr.size} values; shape {shape} needs {count}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise bad("input 'images' values must be within 0–255 (UINT8)")
    return arr.reshape(shape).astype(np.uint8)


def _bytes_tensor(spec: dict[str, Any], shape: list[int], blob: bytes | None) -> list[bytes]:
    if len(shape) != 1 or not 1 <= shape[0] <= MAX_IMAGES:
        raise bad(
            f"input 'images' of datatype BYTES has shape {shape}; expected [B] with 1 ≤ B ≤ {MAX_IMAGES}"
        )
    if blob is not None:
        items = _bytes_elements(blob)
    else:
        data = spec.get("data")
        if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
            raise bad("BYTES input 'images' needs 'data': a list of base64-encoded image files")
        try:
            items = [base64.b64decode(d, validate=True) for d in data]
        except (binascii.Error, ValueError):
            raise bad("BYTES input 'images' data must be base64-encoded image files") from None
    if len(items) != shape[0]:
        raise bad(f"input 'images' has {len(items)} elements; shape {shape} says {shape[0]}")
    return items


def parse_infer(
    body: bytes, header_length: str | None, input_size: int, outputs: Sequence[str] = OUTPUTS
) -> V2Request:
    """Decode an infer request body; ApiError 400 naming the problem for anything malformed.

    ``outputs`` are the ones this model gives (:func:`model_outputs`); a request naming none gets
    them all but the anomaly map.
    """
    head, binary = _split_binary(body, header_length)
    try:
        doc = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise bad("the body is not JSON; send an inference request object with 'inputs'") from None
    if not isinstance(doc, dict):
        raise bad("the body must be a JSON object with 'inputs'")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise bad(f"'inputs' must be a list with exactly one tensor named '{INPUT_NAME}'")
    spec = inputs[0]
    if spec.get("name") != INPUT_NAME:
        raise bad(f"unknown input {spec.get('name')!r}; this model takes one input named '{INPUT_NAME}'")
    shape = _shape(spec)
    size = _binary_size(spec)
    blob = None
    if size is not None:
        if size > len(binary):
            raise bad(f"binary_data_size {size} is more than the {len(binary)} binary bytes sent")
        blob = binary[:size]
    request_id = doc.get("id")
    request = V2Request(id=str(request_id) if request_id is not None else None)
    datatype = spec.get("datatype")
    if datatype == "UINT8":
        request.tensor = _uint8_tensor(spec, shape, input_size, blob)
    elif datatype == "BYTES":
        request.encoded = _bytes_tensor(spec, shape, blob)
    else:
        raise bad(
            f"input 'images' has datatype {datatype!r}; accepted: UINT8 [B, {input_size}, "
            f"{input_size}, 3] (NHWC RGB) or BYTES [B] (encoded JPEG, PNG or BMP)"
        )
    asked = doc.get("outputs")
    request.outputs = [o for o in outputs if o != MAP_OUTPUT]
    if asked is not None:
        if not isinstance(asked, list) or not all(isinstance(o, dict) for o in asked):
            raise bad("'outputs' must be a list of objects with a 'name'")
        names = [o.get("name") for o in asked]
        unknown = [n for n in names if n not in outputs]
        if unknown:
            raise bad(f"unknown outputs {unknown}; this model gives {', '.join(outputs)}")
        request.outputs = [str(n) for n in names]
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise bad("'parameters' must be an object")
    request.parameters = params
    return request
