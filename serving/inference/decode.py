"""Request bytes to model input: sniff the format, guard the pixel count, decode with the model's recipe.

Only JPEG, PNG and BMP are ever handed to Pillow, and the pixel count is read from the header
before any pixel is decoded, so a 50,000 × 50,000 PNG costs a few hundred bytes of parsing.
The pixels come from :class:`kensa.models.data.imageprep.Preprocess`, the recipe the model was
trained with (read from its ONNX metadata), so serving sees exactly what training saw.
Runs in the decode thread pool, never on the event loop.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from kensa.models.data.imageprep import Preprocess, as_preprocess
from kensa.serving.errors import ACCEPTED_FORMATS, ApiError
from kensa.serving.inference.imagestats import image_stats

# Magic numbers of the formats we open, mapped to Pillow's format names.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"BM", "BMP"),
)

# Formats people send by mistake, named in the error so the caller knows what we saw.
_KNOWN_OTHERS: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "a PDF document"),
    (b"GIF8", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "a gzip archive"),
)

EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp"}


@dataclass(frozen=True)
class DecodedImage:
    """One image ready for the model: pixels (S, S, 3) uint8 RGB and what was logged about it."""

    pixels: np.ndarray
    sha256: str
    format: str  # JPEG | PNG | BMP | TENSOR
    width: int
    height: int
    stats: dict[str, float]
    recipe: Preprocess | None = None  # what made ``pixels``; None for a raw tensor


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _describe_unknown(head: bytes) -> str:
    for magic, name in _KNOWN_OTHERS:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    text = head[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<svg", b"<?xml")) or b"<svg" in text:
        return "an SVG or XML document"
    if text.startswith((b"<!doctype html", b"<html")) or b"<html" in text:
        return "an HTML document"
    try:
        head[:512].decode("utf-8")
    except UnicodeDecodeError:
        return "binary data of an unknown format"
    return "text"


def sniff_format(data: bytes) -> str:
    """The Pillow format name of ``data`` from its magic number; ApiError for anything else."""
    if not data:
        raise ApiError(400, "empty_image", f"the image is empty (0 bytes); send a {ACCEPTED_FORMATS} file")
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    seen = _describe_unknown(data)
    raise ApiError(
        415,
        "unsupported_image_format",
        f"the image looks like {seen}; accepted formats: {ACCEPTED_FORMATS}",
    )


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Refuse images whose header declares more pixels than ``max_pixels`` (decompression bombs)."""
    if width <= 0 or height <= 0:
        raise ApiError(422, "undecodable_image", f"the image declares an empty size {width} × {height}")
    if width * height > max_pixels:
        raise ApiError(
            422,
            "too_many_pixels",
            f"the image declares {width} × {height} = {width * height:,} pixels; "
            f"at most {max_pixels:,} are accepted",
        )


def decode_image(
    data: bytes, recipe: Preprocess | int, max_pixels: int, digest: str | None = None
) -> DecodedImage:
    """Decode encoded image bytes into the (S, S, 3) uint8 input of the model.

    ``recipe`` is the model's preprocessing (a bare size means the legacy square resize).
    Raises ApiError (4xx) for empty, unsupported, oversized or undecodable images.
    """
    prep = as_preprocess(recipe)
    fmt = sniff_format(data)
    try:
        with warnings.catch_warnings():
            # Pillow warns (then errors) about large images itself; our own limit comes first.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = img.size
            check_pixels(width, height, max_pixels)
            # JPEG decodes at 1/2, 1/4 or 1/8 scale where that still covers the target (draft).
            pixels = prep.prepare(img)
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ApiError(
            422,
            "too_many_pixels",
            f"the image declares too many pixels; at most {max_pixels:,} are accepted",
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        # Pillow's message says what is broken ("image file is truncated") and names no path.
        raise ApiError(
            422,
            "undecodable_image",
            f"the {fmt} image cannot be decoded ({exc}); send a complete {ACCEPTED_FORMATS} file",
        ) from exc
    return DecodedImage(
        pixels=pixels,
        sha256=digest or sha256_hex(data),
        format=fmt,
        width=width,
        height=height,
        stats=image_stats(pixels),
        recipe=prep,
    )


def tensor_image(pixels: np.ndarray) -> DecodedImage:
    """A raw uint8 (S, S, 3) tensor from the v2 protocol; hashed over its bytes."""
    arr = np.ascontiguousarray(pixels, dtype=np.uint8)
    return DecodedImage(
        pixels=arr,
        sha256=sha256_hex(arr.tobytes()),
        format="TENSOR",
        width=int(arr.shape[1]),
        height=int(arr.shape[0]),
        stats=image_stats(arr),
    )


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of a raw tensor, for storing v2 tensor inputs like any other image."""
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()
