"""Where an anomaly model saw the defect: the region cut from its map, the peak, the heatmap PNG.

An anomaly model's ``anomaly_map`` (S, S) is normalised like its score, so the review band's
thresholds read on it directly: the region is the blob of the map at or above ``t_defect`` (else
``t_ok``) that holds the map's peak. Only the peak's blob, not every pixel over the threshold: on a
textured part a few faint spots cross ``t_ok`` far from the defect, and one box around all of them
spans the part and points nowhere. A threshold outside (0, 1] is a band sentinel (nothing passes,
or nothing is flagged, automatically), not a level of the map, and cuts no region.

Everything here runs in worker threads (the batcher's inference thread, the decode pool), never
on the event loop: labelling a 256 px map costs about a millisecond.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from kensa.models.data.imageprep import Preprocess, as_preprocess

# 8-connected blobs: a thin diagonal scratch is one blob, not a chain of single pixels.
_EIGHT = np.ones((3, 3), dtype=bool)
# A typical good part's score (the normalisation puts it at about 0.5): where the heatmap's
# colours start when the band has no t_ok on the map's scale.
_TYPICAL_GOOD = 0.5
# Box outline of the region on the heatmap: cyan stands out from the yellow-red heat and grey metal.
_OUTLINE = np.array([0, 255, 255], dtype=np.float32)


@dataclass(frozen=True)
class Box:
    """A rectangle in pixels, ``x1`` and ``y1`` exclusive (Python slices: ``a[y0:y1, x0:x1]``)."""

    x0: int
    y0: int
    x1: int
    y1: int

    def to_dict(self) -> dict[str, int]:
        return {"x0": self.x0, "y0": self.y0, "x1": self.x1, "y1": self.y1}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Box:
        return cls(int(d["x0"]), int(d["y0"]), int(d["x1"]), int(d["y1"]))


@dataclass(frozen=True)
class Region:
    """The peak's blob of the map at or above a band threshold, and where it lies in the image."""

    threshold: str  # t_defect | t_ok: the band threshold it was cut at
    level: float  # that threshold's value
    box: Box  # pixels of the model input
    image_box: Box  # pixels of the image as sent (the model's letterbox, ROI or resize undone)
    area_fraction: float  # share of the model input inside the blob


@dataclass(frozen=True)
class Finding:
    """What an anomaly model says about one part besides its verdict: score, peak and region."""

    score: float
    input_size: int
    peak_value: float
    peak_x: int  # pixel of the model input
    peak_y: int
    peak_image: tuple[float, float]  # the peak pixel's centre in the image as sent
    region: Region | None  # None when the map reaches neither threshold

    def to_dict(self) -> dict[str, Any]:
        """The ``anomaly`` object of a v1 answer (and of the prediction log's ``image_stats``)."""
        s = self.input_size
        region = None
        if self.region is not None:
            r, b = self.region, self.region.box
            region = {
                "threshold": r.threshold,
                "level": round(r.level, 6),
                "box": b.to_dict(),
                "box_fraction": {k: round(v / s, 6) for k, v in b.to_dict().items()},
                "image_box": r.image_box.to_dict(),
                "area_fraction": round(r.area_fraction, 6),
            }
        return {
            "score": round(self.score, 6),
            "input_size": s,
            "peak": {
                "value": round(self.peak_value, 6),
                "x": self.peak_x,
                "y": self.peak_y,
                "fraction": {"x": round((self.peak_x + 0.5) / s, 6), "y": round((self.peak_y + 0.5) / s, 6)},
                "image": {"x": self.peak_image[0], "y": self.peak_image[1]},
            },
            "region": region,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding:
        """The finding :meth:`to_dict` wrote (a replayed answer, rebuilt from its row)."""
        peak, r = d["peak"], d.get("region")
        region = None
        if r is not None:
            region = Region(
                str(r["threshold"]),
                float(r["level"]),
                Box.from_dict(r["box"]),
                Box.from_dict(r["image_box"]),
                float(r["area_fraction"]),
            )
        return cls(
            score=float(d["score"]),
            input_size=int(d["input_size"]),
            peak_value=float(peak["value"]),
            peak_x=int(peak["x"]),
            peak_y=int(peak["y"]),
            peak_image=(float(peak["image"]["x"]), float(peak["image"]["y"])),
            region=region,
        )


@dataclass(frozen=True)
class HeatSource:
    """What a heatmap is drawn from: views into the batch's arrays, never copies."""

    pixels: np.ndarray  # (S, S, 3) uint8: the model input, as the model saw it
    amap: np.ndarray  # (S, S) float32
    t_ok: float
    t_defect: float
    region: Box | None


def _on_scale(value: float) -> bool:
    return 0.0 < value <= 1.0


def _blob_box(amap: np.ndarray, level: float, py: int, px: int) -> tuple[Box, float]:
    labels, _ = ndimage.label(amap >= level, structure=_EIGHT)
    peak_label = int(labels[py, px])
    rows, cols = ndimage.find_objects(labels, max_label=peak_label)[peak_label - 1]
    area = float(np.count_nonzero(labels[rows, cols] == peak_label)) / amap.size
    return Box(int(cols.start), int(rows.start), int(cols.stop), int(rows.stop)), area


def to_image(recipe: Preprocess, width: int, height: int) -> tuple[float, float, float, float]:
    """(scale_x, scale_y, offset_x, offset_y): image = offset + (input - pad) × scale.

    Undoes the recipe that made the model input from a ``width`` × ``height`` image: the crop
    (ROI), the resize and the letterbox padding.
    """
    size = recipe.size
    tw, th = recipe.content_size(width, height)
    x0, y0, x1, y1 = recipe.roi or (0.0, 0.0, 1.0, 1.0)
    sx, sy = (x1 - x0) * width / tw, (y1 - y0) * height / th
    left, top = (size - tw) // 2, (size - th) // 2
    return sx, sy, x0 * width - left * sx, y0 * height - top * sy


def _image_box(box: Box, recipe: Preprocess, width: int, height: int) -> Box:
    sx, sy, ox, oy = to_image(recipe, width, height)
    x0, y0, x1, y1 = recipe.roi or (0.0, 0.0, 1.0, 1.0)
    # Clamped to the part of the image the model saw: padding maps to no pixel of the image.
    lo_x, hi_x, lo_y, hi_y = x0 * width, x1 * width, y0 * height, y1 * height

    def clamp(v: float, lo: float, hi: float) -> float:
        return min(max(v, lo), hi)

    return Box(
        math.floor(clamp(ox + box.x0 * sx, lo_x, hi_x)),
        math.floor(clamp(oy + box.y0 * sy, lo_y, hi_y)),
        math.ceil(clamp(ox + box.x1 * sx, lo_x, hi_x)),
        math.ceil(clamp(oy + box.y1 * sy, lo_y, hi_y)),
    )


def locate(
    amap: np.ndarray,
    score: float,
    t_ok: float,
    t_defect: float,
    recipe: Preprocess | None,
    width: int,
    height: int,
) -> Finding:
    """The finding of one (S, S) map for an image of ``width`` × ``height`` made by ``recipe``.

    ``recipe`` None means a raw tensor: the model input is the image, or its plain resize.
    """
    size = int(amap.shape[0])
    prep = recipe if recipe is not None else as_preprocess(size)
    py, px = (int(v) for v in np.unravel_index(int(np.argmax(amap)), amap.shape))
    peak = float(amap[py, px])
    sx, sy, ox, oy = to_image(prep, width, height)
    peak_image = (round(ox + (px + 0.5) * sx, 1), round(oy + (py + 0.5) * sy, 1))
    region = None
    for name, level in (("t_defect", t_defect), ("t_ok", t_ok)):
        if _on_scale(level) and peak >= level:
            box, area = _blob_box(amap, level, py, px)
            region = Region(name, level, box, _image_box(box, prep, width, height), area)
            break
    return Finding(score, size, peak, px, py, peak_image, region)


def render_heatmap(source: HeatSource) -> bytes:
    """A PNG the size of the model input: the part as the model saw it, the map over it.

    Colours are anchored to the band, not to each image's own range (which would make every good
    part look hot): below ``t_ok`` the part shows as it is; from ``t_ok`` to ``t_defect`` the heat
    runs from faint yellow to strong red; the region's box is outlined in cyan.
    """
    lo = source.t_ok if _on_scale(source.t_ok) and source.t_ok < 1.0 else _TYPICAL_GOOD
    hi = source.t_defect if lo < source.t_defect <= 1.0 else min(1.0, lo + 0.1)
    amap = source.amap.astype(np.float32, copy=False)
    u = np.clip((amap - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    alpha = np.where(amap >= lo, 0.35 + 0.3 * u, 0.0)[..., None]
    heat = np.stack([np.full_like(u, 255.0), 255.0 * (1.0 - u), np.zeros_like(u)], axis=-1)
    out = source.pixels.astype(np.float32) * (1.0 - alpha) + heat * alpha
    if source.region is not None:
        b = source.region
        out[b.y0, b.x0 : b.x1] = _OUTLINE
        out[b.y1 - 1, b.x0 : b.x1] = _OUTLINE
        out[b.y0 : b.y1, b.x0] = _OUTLINE
        out[b.y0 : b.y1, b.x1 - 1] = _OUTLINE
    buf = io.BytesIO()
    Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()
