"""The review page's heatmap: the served anomaly model run again on a review item's stored image.

Serving keeps an anomaly model's region and peak in the prediction log, not its map (S × S floats
per part), so the console draws the heatmap on demand: decode the stored image with the served
model's recipe, run the model, cut the region as serving does, and draw the map over the image
*as it was sent*, at its own size (the model's crop, resize and letterbox undone), so the overlay
lies exactly on the part image the page shows. A large image is drawn at most
``MAX_SIDE`` px on its longer side.

:func:`draw` runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from kensa.serving.inference.anomaly import Box, Finding, HeatSource, locate, render_heatmap, to_image
from kensa.serving.inference.decode import decode_image, sniff_format

if TYPE_CHECKING:
    from kensa.serving.inference.engine import ServedModel

# Longest side of a drawn heatmap: the page shows the part at 320 px, 960 px zoomed.
MAX_SIDE = 1024


class HeatmapUnavailable(Exception):
    """No heatmap can be drawn: status, stable code and a sentence for the person."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Heatmap:
    """A drawn heatmap: the PNG, the model version that drew it, and what that model found."""

    png: bytes
    model_name: str
    model_version: str
    finding: Finding


def check_model(model: ServedModel | None) -> ServedModel:
    """``model`` if it can draw a heatmap; HeatmapUnavailable (503 none, 409 a classifier)."""
    if model is None:
        raise HeatmapUnavailable(503, "no_model", "serving has no model loaded; retry shortly")
    if not model.spec.is_anomaly:
        raise HeatmapUnavailable(
            409,
            "heatmap_unavailable",
            f"the served model {model.name} version {model.version} is a classifier: it has no "
            "anomaly map to draw; a heatmap needs an anomaly model (learned from good parts) as champion",
        )
    return model


def _scaled_box(box: Box, k: float, width: int, height: int) -> Box | None:
    x0, y0 = min(math.floor(box.x0 * k), width - 1), min(math.floor(box.y0 * k), height - 1)
    x1, y1 = min(math.ceil(box.x1 * k), width), min(math.ceil(box.y1 * k), height)
    return Box(x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def draw(model: ServedModel, data: bytes, max_pixels: int) -> Heatmap:
    """The heatmap of one encoded image by an anomaly ``model`` (checked by :func:`check_model`).

    Raises ApiError (422) for bytes that are not a readable image, as serving does.
    """
    spec = model.spec
    recipe = spec.preprocess
    decoded = decode_image(data, recipe, max_pixels)  # the pixel-count guard comes first
    out = model.infer(decoded.pixels[None])
    if out.maps is None or out.scores is None:  # an anomaly spec promises both (checked at load)
        raise HeatmapUnavailable(409, "heatmap_unavailable", "the served model returned no anomaly map")
    amap = out.maps[0]
    width, height = decoded.width, decoded.height
    finding = locate(amap, float(out.scores[0]), spec.t_ok, spec.t_defect, recipe, width, height)

    k = min(1.0, MAX_SIDE / max(width, height))
    size = (max(1, round(width * k)), max(1, round(height * k)))
    with Image.open(io.BytesIO(data), formats=[sniff_format(data)]) as img:
        part = img.convert("RGB")
    if part.size != size:
        part = part.resize(size, Image.Resampling.BILINEAR)
    # image = offset + input × scale: each drawn pixel reads the map where the model saw it.
    sx, sy, ox, oy = (v * k for v in to_image(recipe, width, height))
    on_image = Image.fromarray(np.ascontiguousarray(amap, dtype=np.float32), "F").transform(
        size,
        Image.Transform.AFFINE,
        (1.0 / sx, 0.0, -ox / sx, 0.0, 1.0 / sy, -oy / sy),
        resample=Image.Resampling.BILINEAR,
        fillcolor=0.0,  # outside the model's view (its region of interest): no heat
    )
    region = finding.region
    box = _scaled_box(region.image_box, k, *size) if region is not None else None
    source = HeatSource(np.asarray(part, dtype=np.uint8), np.asarray(on_image), spec.t_ok, spec.t_defect, box)
    return Heatmap(render_heatmap(source), model.name, model.version, finding)
