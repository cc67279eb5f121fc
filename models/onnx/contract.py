"""The ONNX artifact contract both sides read: file hash, metadata decoding, recipe, parity sample.

Torch-free on purpose: serving imports this without pulling in PyTorch (seconds per process).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from kensa.models.data.imageprep import LEGACY_FIT, Preprocess

PARITY_SAMPLE_SEED = 1234
PARITY_SAMPLE_SHAPE = 4  # noise images whose expected probs ride in the metadata
# The image recipe (Preprocess.to_json) serving must decode requests with.
PREPROCESS_KEY = "kensa.preprocess"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def decode_metadata(proto: onnx.ModelProto) -> dict[str, Any]:
    """The kensa metadata of a loaded ONNX model, JSON values decoded."""
    out: dict[str, Any] = {}
    for prop in proto.metadata_props:
        try:
            out[prop.key] = json.loads(prop.value)
        except json.JSONDecodeError:
            out[prop.key] = prop.value
    return out


def read_metadata(path: Path) -> dict[str, Any]:
    """The kensa metadata of an ONNX file on disk (weights are not loaded)."""
    return decode_metadata(onnx.load(str(path), load_external_data=False))


def read_preprocess(meta: Mapping[str, Any]) -> Preprocess:
    """The image recipe decoded metadata records; ValueError when it is malformed.

    Files exported before the recipe was recorded were trained on square-resized images:
    they get ``{"fit": "squash"}`` at their ``input_size``, so old models keep their pixels.
    """
    size = meta.get("input_size")
    if isinstance(size, bool) or not isinstance(size, int):
        raise ValueError(f"input_size must be an integer; got {size!r}")
    recorded = meta.get(PREPROCESS_KEY, {"fit": LEGACY_FIT})
    try:
        return Preprocess.from_json(recorded, size)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{PREPROCESS_KEY} is malformed: {exc}") from None


def parity_images(seed: int, n: int, size: int) -> np.ndarray:
    """Deterministic noise images (n, size, size, 3) uint8 that anyone can regenerate."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def parity_sample_images(input_size: int) -> np.ndarray:
    """The images of the parity sample export writes into every model's metadata."""
    return parity_images(PARITY_SAMPLE_SEED, PARITY_SAMPLE_SHAPE, input_size)
