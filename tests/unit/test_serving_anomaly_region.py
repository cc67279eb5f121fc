"""The region, peak and heatmap serving cuts from an anomaly map, on maps and images made here."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from serving_helpers import build_contract_model

from kensa.models.data.imageprep import Preprocess
from kensa.serving.inference.anomaly import Box, Finding, HeatSource, locate, render_heatmap
from kensa.serving.inference.artifact import ModelRefused, load_and_check

S = 96


def _bump(cy: int, cx: int, height: float, sigma: float = 4.0) -> np.ndarray:
    yy, xx = np.mgrid[:S, :S]
    return height * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))


def _two_spots() -> np.ndarray:
    """A strong spot at (row 20, col 30) and a fainter one far away, on a 0.3 floor."""
    return (0.3 + np.maximum(_bump(20, 30, 0.5), _bump(70, 75, 0.3))).astype(np.float32)


def test_region_is_the_peaks_blob_at_t_defect_else_t_ok_else_none() -> None:
    amap = _two_spots()
    found = locate(amap, 0.81, t_ok=0.5, t_defect=0.7, recipe=None, width=S, height=S)
    assert (found.peak_y, found.peak_x) == (20, 30) and found.peak_value == pytest.approx(0.8)
    assert found.region is not None and found.region.threshold == "t_defect"
    b = found.region.box
    assert b.x0 < 30 < b.x1 and b.y0 < 20 < b.y1 and b.x1 - b.x0 < 15
    # Nothing reaches t_defect: cut at t_ok, still only the peak's blob (the faint spot at row 70,
    # col 75 also crosses t_ok but a box around both would span the part).
    lower = locate(amap, 0.81, t_ok=0.5, t_defect=0.9, recipe=None, width=S, height=S).region
    assert lower is not None and lower.threshold == "t_ok" and lower.box.x1 < 60 and lower.box.y1 < 50
    assert (amap[lower.box.y0 : lower.box.y1, lower.box.x0 : lower.box.x1] >= 0.5).any()
    assert locate(amap, 0.81, t_ok=0.85, t_defect=0.9, recipe=None, width=S, height=S).region is None
    # Band sentinels (nothing passes / nothing is flagged automatically) are not map levels.
    assert locate(amap, 0.81, t_ok=-1.0, t_defect=2.0, recipe=None, width=S, height=S).region is None


@pytest.mark.parametrize(
    ("recipe", "width", "height"),
    [
        (Preprocess(S), 240, 120),  # letterbox: bands of padding above and below
        (Preprocess(S), 100, 300),  # letterbox: padding left and right
        (Preprocess(S, "squash"), 240, 120),
        (Preprocess(S, "roi", roi=(0.25, 0.0, 1.0, 0.8)), 400, 300),
    ],
)
def test_image_box_undoes_the_recipe_that_made_the_model_input(
    recipe: Preprocess, width: int, height: int
) -> None:
    """A bright square drawn in the client's image is found in the model input (made by the
    recipe's own ``prepare``), and its box maps back onto the square within a pixel or two."""
    src = np.full((height, width, 3), 40, np.uint8)
    x0, y0 = int(width * 0.55), int(height * 0.4)
    x1, y1 = x0 + width // 5, y0 + height // 5
    src[y0:y1, x0:x1] = 250
    model_input = recipe.prepare(Image.fromarray(src))
    amap = (model_input[..., 0] > 145).astype(np.float32) * 0.9
    found = locate(amap, 0.9, t_ok=0.5, t_defect=0.8, recipe=recipe, width=width, height=height)
    assert found.region is not None
    got = found.region.image_box
    slack = max(width, height) / S + 1  # one model pixel, in image pixels
    assert abs(got.x0 - x0) <= slack and abs(got.y0 - y0) <= slack
    assert abs(got.x1 - x1) <= slack and abs(got.y1 - y1) <= slack
    px, py = found.peak_image
    assert x0 - slack <= px <= x1 + slack and y0 - slack <= py <= y1 + slack


def test_finding_survives_the_prediction_log_round_trip() -> None:
    found = locate(_two_spots(), 0.81, t_ok=0.5, t_defect=0.7, recipe=Preprocess(S), width=2 * S, height=S)
    body = found.to_dict()
    again = Finding.from_dict(body)
    assert again.to_dict() == body
    assert body["region"]["box_fraction"]["x1"] == pytest.approx(found.region.box.x1 / S)  # type: ignore[union-attr]
    quiet = locate(_two_spots(), 0.3, t_ok=0.95, t_defect=0.99, recipe=None, width=S, height=S)
    assert Finding.from_dict(quiet.to_dict()).region is None


def test_heatmap_colours_only_what_reaches_the_band_and_outlines_the_region() -> None:
    pixels = np.random.default_rng(0).integers(60, 200, (S, S, 3), dtype=np.uint8)
    amap = _two_spots()
    box = Box(24, 14, 37, 27)
    png = render_heatmap(HeatSource(pixels, amap, 0.5, 0.7, box))
    out = np.asarray(Image.open(io.BytesIO(png)))
    assert out.shape == (S, S, 3)
    cold = amap < 0.5
    assert (out[cold] == pixels[cold]).all(axis=-1).mean() > 0.99  # the outline is the only change
    assert out[20, 30, 0] > 200 and out[20, 30, 1] < 150  # red at the peak, over t_defect
    assert tuple(out[box.y0, box.x0 + 3]) == (0, 255, 255)


def _with_kind(src: Path, dst: Path, kind: str) -> Path:
    proto = onnx.load(str(src))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "kind", json.dumps(kind)
    onnx.save(proto, str(dst))
    return dst


def test_a_file_that_says_anomaly_must_carry_the_map(tmp_path: Path) -> None:
    """The kind rides in the metadata; a file claiming one it cannot keep is refused at load."""
    classifier = build_contract_model(tmp_path / "c.onnx")
    _, spec = load_and_check(classifier, None)
    assert spec.kind == "classifier" and not spec.is_anomaly  # no kind: a classifier, as before
    with pytest.raises(ModelRefused) as no_map:
        load_and_check(_with_kind(classifier, tmp_path / "a.onnx", "anomaly"), None)
    assert no_map.value.step == "signature" and "score" in no_map.value.reason
    with pytest.raises(ModelRefused) as unknown:
        load_and_check(_with_kind(classifier, tmp_path / "x.onnx", "segmenter"), None)
    assert unknown.value.step == "metadata" and "classifier, anomaly" in unknown.value.reason
