"""The one image recipe training and serving share: decode, crop, resize, letterbox (PIL + numpy only).

Serving must not import torch, and training must see exactly the pixels serving will see, so
both call :meth:`Preprocess.prepare` on an opened (not yet loaded) PIL image: the same JPEG
draft (DCT-domain downscale), the same crop, the same bilinear resize, the same grey padding.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
from PIL import Image, JpegImagePlugin

Fit = Literal["letterbox", "roi", "squash"]
FITS: tuple[Fit, ...] = ("letterbox", "roi", "squash")
DEFAULT_FIT: Fit = "letterbox"
# What a model file with no recorded recipe was trained with (kensa before recipes were recorded).
LEGACY_FIT: Fit = "squash"
DEFAULT_PAD = 114  # mid grey: the letterbox border carries no edge the model could mistake for a part
# Sizes a kensa training run accepts. 128-384 px is the range for real parts (a few-pixel scratch
# must survive the resize); 32-96 px stays possible for tests and the synthetic demo line.
MIN_SIZE, MAX_SIZE = 32, 384
RECOMMENDED_SIZES = (128, 384)
# Sizes a recipe read from a model file may name: serving's bound on a declared input size.
MIN_DECODE_SIZE, MAX_DECODE_SIZE = 8, 4096

Box = tuple[float, float, float, float]


def check_image_size(size: object, what: str = "image_size") -> int:
    """``size`` if kensa can train at it; ValueError naming the accepted range otherwise."""
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        lo, hi = RECOMMENDED_SIZES
        msg = (
            f"{what} must be an integer from {MIN_SIZE} to {MAX_SIZE} px "
            f"({lo}-{hi} for real parts; below {lo} only for tests and the demo line); got {size!r}"
        )
        raise ValueError(msg)
    return size


def parse_fit(value: object) -> Fit:
    """``value`` as a fit name; ValueError naming the accepted ones otherwise."""
    if value not in FITS:
        msg = f"fit must be one of {', '.join(FITS)}; got {value!r}"
        raise ValueError(msg)
    return cast(Fit, value)


def parse_roi(value: object) -> Box | None:
    """A region of interest (x0, y0, x1, y1), fractions of the width and height, or None.

    Accepts a sequence of four numbers or the text "x0,y0,x1,y1"; ValueError otherwise.
    """
    if value is None:
        return None
    accepted = "four numbers x0,y0,x1,y1 with 0 ≤ x0 < x1 ≤ 1 and 0 ≤ y0 < y1 ≤ 1 (fractions of the image)"
    items: Sequence[object]
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, Sequence):
        items = value
    else:
        raise ValueError(f"roi must be {accepted}; got {value!r}")
    try:
        if len(items) != 4 or any(isinstance(v, bool) for v in items):
            raise ValueError
        x0, y0, x1, y1 = (float(cast(Any, v)) for v in items)
    except (TypeError, ValueError):
        raise ValueError(f"roi must be {accepted}; got {value!r}") from None
    inside = all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in (x0, y0, x1, y1))
    if not inside or not (x0 < x1 and y0 < y1):
        raise ValueError(f"roi must be {accepted}; got {value!r}")
    return (x0, y0, x1, y1)


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


@dataclass(frozen=True)
class Preprocess:
    """How a photo of a part becomes the (size, size, 3) uint8 RGB input of a model.

    ``letterbox`` scales the long side to ``size`` and pads the rest with grey ``pad``, centred
    (aspect kept); ``roi`` first crops ``roi`` (x0, y0, x1, y1 as fractions of the width and
    height), then letterboxes the crop; ``squash`` resizes to a square, ignoring aspect (kensa's
    recipe before recipes were recorded, kept for the models trained with it).
    """

    size: int
    fit: Fit = DEFAULT_FIT
    roi: Box | None = None
    pad: int = DEFAULT_PAD

    def __post_init__(self) -> None:
        size = self.size
        if isinstance(size, bool) or not isinstance(size, int):
            raise ValueError(f"size must be an integer number of pixels; got {size!r}")
        if not MIN_DECODE_SIZE <= size <= MAX_DECODE_SIZE:
            msg = f"size must be from {MIN_DECODE_SIZE} to {MAX_DECODE_SIZE} px; got {size}"
            raise ValueError(msg)
        parse_fit(self.fit)
        roi = parse_roi(self.roi)
        object.__setattr__(self, "roi", roi)  # a list from JSON becomes the hashable tuple
        if self.fit == "roi" and roi is None:
            raise ValueError("fit 'roi' needs a region of interest: roi = x0,y0,x1,y1 (fractions, 0-1)")
        if self.fit != "roi" and roi is not None:
            raise ValueError(f"a region of interest is only used with fit 'roi'; fit is {self.fit!r}")
        if isinstance(self.pad, bool) or not isinstance(self.pad, int) or not 0 <= self.pad <= 255:
            raise ValueError(f"pad must be a grey level 0-255; got {self.pad!r}")

    # ------------------------------------------------------------------ records

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "fit": self.fit,
            "roi": list(self.roi) if self.roi is not None else None,
            "pad": self.pad,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, value: str | Mapping[str, Any], size: int | None = None) -> Preprocess:
        """The recipe recorded by :meth:`to_json` (text or decoded mapping); ValueError if malformed.

        ``size`` fills in a record that names none and must agree with one that does.
        """
        data: object = json.loads(value) if isinstance(value, str) else value
        if not isinstance(data, Mapping):
            raise ValueError(f"a preprocessing recipe must be a JSON object; got {value!r}")
        unknown = sorted(set(data) - {"size", "fit", "roi", "pad"})
        if unknown:
            raise ValueError(f"unknown preprocessing fields {unknown}; accepted: size, fit, roi, pad")
        recorded = data.get("size", size)
        if size is not None and recorded != size:
            raise ValueError(f"the recipe's size {recorded!r} differs from the model's input size {size}")
        if recorded is None:
            raise ValueError("a preprocessing recipe needs a size")
        return cls(
            size=cast(int, recorded),
            fit=parse_fit(data.get("fit", DEFAULT_FIT)),
            roi=parse_roi(data.get("roi")),
            pad=cast(int, data.get("pad", DEFAULT_PAD)),
        )

    def describe(self) -> str:
        roi = f" {','.join(f'{v:g}' for v in self.roi)}" if self.roi else ""
        return f"{self.fit}{roi} {self.size} px"

    # ------------------------------------------------------------------ geometry

    def _crop(self, width: int, height: int) -> Box:
        """The source region the model sees, in pixels of a ``width`` × ``height`` image."""
        x0, y0, x1, y1 = self.roi or (0.0, 0.0, 1.0, 1.0)
        return (x0 * width, y0 * height, x1 * width, y1 * height)

    def content_size(self, width: int, height: int) -> tuple[int, int]:
        """Width and height the image (or its ROI) takes inside the square output."""
        x0, y0, x1, y1 = self._crop(width, height)
        cw, ch = x1 - x0, y1 - y0
        if cw < 1 or ch < 1:
            msg = (
                f"the region of interest {self.roi} covers {cw:.2f} × {ch:.2f} px of a "
                f"{width} × {height} image; it must cover at least one pixel each way"
            )
            raise ValueError(msg)
        s = self.size
        if self.fit == "squash":
            return s, s
        if cw >= ch:
            return s, min(s, max(1, _round(s * ch / cw)))
        return min(s, max(1, _round(s * cw / ch))), s

    def draft_request(self, width: int, height: int) -> tuple[int, int]:
        """The size to ask libjpeg's draft for: at least the pixels the crop's resize needs.

        Draft picks the largest 1/2, 1/4 or 1/8 scale whose output still covers this request,
        so the crop keeps at least ``content_size`` pixels and is never upsampled needlessly.
        """
        tw, th = self.content_size(width, height)
        if self.roi is None:
            return tw, th
        x0, y0, x1, y1 = self._crop(width, height)
        # Scale the request so the crop (a part of the image) keeps tw × th pixels after draft.
        return (
            max(1, math.ceil(tw * width / (x1 - x0) - 1e-9)),
            max(1, math.ceil(th * height / (y1 - y0) - 1e-9)),
        )

    # ------------------------------------------------------------------ pixels

    def prepare(self, img: Image.Image) -> np.ndarray:
        """An opened, not yet loaded image as the model input: (size, size, 3) uint8 RGB.

        ValueError when the region of interest covers less than a pixel of this image.
        """
        width, height = img.size
        tw, th = self.content_size(width, height)
        extent = (float(width), float(height))
        if isinstance(img, JpegImagePlugin.JpegImageFile):
            # DCT-domain downscale: a 2000 px part decodes ~10x faster for a 256 px model.
            drafted = img.draft("RGB", self.draft_request(width, height))
            if drafted is not None:
                extent = (drafted[1][2], drafted[1][3])  # the source's extent in drafted pixels
        rgb = img.convert("RGB")
        x0, y0, x1, y1 = self.roi or (0.0, 0.0, 1.0, 1.0)
        box: Box | None = (x0 * extent[0], y0 * extent[1], x1 * extent[0], y1 * extent[1])
        if box == (0.0, 0.0, float(rgb.width), float(rgb.height)):
            box = None  # the whole decoded image: PIL's plain resize, bit for bit
        if box is not None or rgb.size != (tw, th):
            rgb = rgb.resize((tw, th), Image.Resampling.BILINEAR, box=box)
        content = np.asarray(rgb, dtype=np.uint8)
        if (tw, th) == (self.size, self.size):
            return np.ascontiguousarray(content)
        out = np.full((self.size, self.size, 3), self.pad, dtype=np.uint8)
        left, top = (self.size - tw) // 2, (self.size - th) // 2
        out[top : top + th, left : left + tw] = content
        return out


def as_preprocess(recipe: Preprocess | int) -> Preprocess:
    """A recipe from a recipe or a bare size; a bare size means the legacy square resize."""
    return recipe if isinstance(recipe, Preprocess) else Preprocess(recipe, LEGACY_FIT)


def preprocess_from_config(config: Mapping[str, Any], size: int) -> Preprocess:
    """The recipe a training config (a checkpoint's or the ONNX ``training_config``) records.

    A config from before recipes were recorded names no ``fit``: it was trained squashed.
    """
    return Preprocess(size, parse_fit(config.get("fit", LEGACY_FIT)), parse_roi(config.get("roi")))
