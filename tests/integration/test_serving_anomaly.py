"""An anomaly model served: the verdict with the defect's region, a heatmap, and the map over v2.

PatchCore is fitted once per module on good parts of the synthetic line at 96 px (a small bank, so
it costs seconds), its band calibrated on good and defective parts, exported with parity, and
served by a real ``kensa serve`` process. It is judged on parts it never saw, whose true defect
masks come from the line itself. A contract classifier is served beside it for what a classifier
must refuse.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from serving_helpers import Api, Server, make_keys, serve_api, solid

from kensa.models.data.imageprep import Preprocess
from kensa.models.evaluation.anomaly_band import calibrate_anomaly_band
from kensa.models.line.synthetic import (
    DEFECT_TYPES,
    LineConditions,
    PartRecord,
    encode_png,
    generate_part,
    iter_parts,
    part_seed,
)
from kensa.models.nets.patchcore import PatchCoreConfig, fit_patchcore, score_images
from kensa.models.onnx.anomaly import export_anomaly_model
from kensa.models.onnx.contract import PREPROCESS_KEY

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SIZE = 96
NAME = "patchcore-line"
# Parts judged below come from this stream; the fit and the band never see it.
JUDGED_STREAM = 55


def _build_anomaly_model(path: Path) -> Path:
    """Good parts only for the bank; good and defective parts (other streams) for the band."""
    good = [img for img, rec in iter_parts(120, 21, LineConditions(), SIZE) if rec.label == "ok"][:60]
    fit = fit_patchcore(torch.from_numpy(np.stack(good)), PatchCoreConfig(bank_size=256))
    cal_good = [generate_part(part_seed(99, k), LineConditions(), SIZE, "ok")[0] for k in range(60)]
    cal_bad = [
        generate_part(part_seed(98, k), LineConditions(), SIZE, DEFECT_TYPES[k % len(DEFECT_TYPES)])[0]
        for k in range(50)
    ]
    cal = np.stack(cal_good + cal_bad)
    scores, _ = score_images(fit.net, torch.from_numpy(cal))
    band = calibrate_anomaly_band(scores, np.arange(len(cal)) >= len(cal_good)).to_dict()
    meta = {"model_name": "patchcore", PREPROCESS_KEY: Preprocess(SIZE).to_dict()}
    export_anomaly_model(fit.net, SIZE, band, path, cal[::10], meta)
    return path


@pytest.fixture(scope="module")
def anomaly_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    root = tmp_path_factory.mktemp("serving-anomaly")
    model = _build_anomaly_model(root / f"{NAME}.onnx")
    url = f"sqlite:///{root / 'kensa.db'}"
    keys = make_keys(url, ["line"])
    server = Server(root, url, model=model, env={"KENSA_SAMPLE_RATE": "0"}).start()
    yield Api(server, keys, url, root, NAME)
    assert server.stop() in (0, -15), server.log()[-2000:]
    assert "Traceback" not in server.log(), server.log()[-4000:]


@pytest.fixture(scope="module")
def classifier_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    yield from serve_api(tmp_path_factory.mktemp("serving-classifier"))


def _part(label: str, k: int) -> tuple[np.ndarray, PartRecord]:
    return generate_part(part_seed(JUDGED_STREAM, k), LineConditions(), SIZE, label)


def _inspect(api: Api, image: np.ndarray, heatmap: bool = False, key: str | None = None) -> httpx.Response:
    headers = api.headers(**{"content-type": "image/png"}, **({"Idempotency-Key": key} if key else {}))
    params = {"heatmap": "true"} if heatmap else {}
    return httpx.post(
        f"{api.server.base}/v1/inspect", content=encode_png(image), params=params, headers=headers, timeout=30
    )


def _box(d: dict[str, Any]) -> tuple[int, int, int, int]:
    return d["x0"], d["y0"], d["x1"], d["y1"]


def _png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


# ---------------------------------------------------------------- v1: verdict and region


def test_defective_parts_get_a_region_on_the_true_defect(anomaly_api: Api) -> None:
    """Scratches and dents the line drew: the answer's box lies on the defect's own mask, and is
    a small part of the image (a box around everything would overlap any mask)."""
    hits, areas = [], []
    for label in ("defect_scratch", "defect_dent"):
        for k in range(6):
            image, record = _part(label, k)
            r = _inspect(anomaly_api, image)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["defect_type"] == "defect_anomaly" and "heatmap_png" not in body["anomaly"]
            found = body["anomaly"]
            assert found["input_size"] == SIZE
            assert found["score"] == pytest.approx(body["probs"]["defect_anomaly"], abs=1e-5)
            region = found["region"]
            if region is None:
                hits.append(False)
                continue
            x0, y0, x1, y1 = _box(region["box"])
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
            assert region["threshold"] in ("t_defect", "t_ok")
            # The box is cut around the peak, and the peak is where the map is highest.
            peak = found["peak"]
            assert x0 <= peak["x"] < x1 and y0 <= peak["y"] < y1 and peak["value"] >= region["level"]
            assert region["box_fraction"] == pytest.approx(
                {k: v / SIZE for k, v in region["box"].items()}, abs=1e-6
            )
            # A square image at the input size is the model input itself.
            assert region["image_box"] == region["box"]
            hits.append(bool(record.defect_mask[y0:y1, x0:x1].any()))
            areas.append((x1 - x0) * (y1 - y0) / SIZE**2)
    assert np.mean(hits) >= 0.6, f"region on the defect for {np.mean(hits):.0%} of {len(hits)} parts"
    assert np.median(areas) < 0.15, f"regions cover a median {np.median(areas):.0%} of the image"


def test_image_box_is_in_the_pixels_of_the_image_as_sent(anomaly_api: Api) -> None:
    """A client sends its own (larger) image: the box comes back in that image's pixels too."""
    image, _ = _part("defect_scratch", 2)
    big = np.asarray(Image.fromarray(image).resize((2 * SIZE, 2 * SIZE), Image.Resampling.NEAREST))
    r = _inspect(anomaly_api, big)
    assert r.status_code == 200, r.text
    region = r.json()["anomaly"]["region"]
    assert region is not None
    assert _box(region["image_box"]) == tuple(2 * v for v in _box(region["box"]))


def test_heatmap_is_a_png_at_the_input_size_and_a_replay_keeps_the_region(anomaly_api: Api) -> None:
    image, _ = _part("defect_dent", 3)
    r = _inspect(anomaly_api, image, heatmap=True, key="dent-3-heatmap")
    assert r.status_code == 200, r.text
    found = r.json()["anomaly"]
    heat = _png(found["heatmap_png"])
    assert heat.shape == (SIZE, SIZE, 3) and heat.dtype == np.uint8
    x0, y0, x1, y1 = _box(found["region"]["box"])
    # Coloured where the map is hot, the part as it is where the map is cold (below t_ok).
    inside = np.abs(heat[y0:y1, x0:x1].astype(int) - image[y0:y1, x0:x1]).mean()
    assert inside > 20, f"the region's pixels changed by only {inside:.1f} grey levels"
    assert (heat == image).all(axis=-1).mean() > 0.5
    again = _inspect(anomaly_api, image, heatmap=True, key="dent-3-heatmap")
    assert again.status_code == 200 and again.json()["replayed"] is True
    stored = again.json()["anomaly"]
    # The log keeps the region, not the map: the replay names the same box and has no heatmap.
    assert stored["region"] == found["region"] and stored["peak"] == found["peak"]
    assert stored["heatmap_png"] is None


def test_batch_route_answers_a_region_and_heatmap_per_image(anomaly_api: Api) -> None:
    images = [_part("defect_scratch", 4)[0], _part("ok", 1)[0]]
    r = httpx.post(
        f"{anomaly_api.server.base}/v1/inspect/batch",
        params={"heatmap": "true"},
        files=[("images", (f"{i}.png", encode_png(img), "image/png")) for i, img in enumerate(images)],
        headers=anomaly_api.headers(),
        timeout=30,
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [_png(res["anomaly"]["heatmap_png"]).shape for res in results] == [(SIZE, SIZE, 3)] * 2


# ---------------------------------------------------------------- v2: the map as an output


def test_v2_metadata_lists_the_map_and_infer_returns_it_by_name(anomaly_api: Api) -> None:
    base, headers = f"{anomaly_api.server.base}/v2/models/{NAME}", anomaly_api.headers()
    meta = httpx.get(base, headers=headers, timeout=30).json()
    outputs = {o["name"]: o for o in meta["outputs"]}
    assert outputs["anomaly_map"] == {"name": "anomaly_map", "datatype": "FP32", "shape": [-1, SIZE, SIZE]}
    assert outputs["score"]["shape"] == [-1] and "probs" in outputs

    image, _ = _part("defect_dent", 4)
    tensor = {
        "name": "images",
        "datatype": "UINT8",
        "shape": [1, SIZE, SIZE, 3],
        "data": image.ravel().tolist(),
    }
    asked = [{"name": "anomaly_map"}, {"name": "score"}, {"name": "verdict"}]
    r = httpx.post(f"{base}/infer", json={"inputs": [tensor], "outputs": asked}, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    got = {o["name"]: o for o in r.json()["outputs"]}
    assert list(got) == ["anomaly_map", "score", "verdict"]
    amap = np.asarray(got["anomaly_map"]["data"]).reshape(got["anomaly_map"]["shape"])
    assert amap.shape == (1, SIZE, SIZE) and 0 <= amap.min() <= amap.max() < 1
    # The same part over v1: its peak is the map's maximum.
    peak = _inspect(anomaly_api, image).json()["anomaly"]["peak"]
    assert amap[0, peak["y"], peak["x"]] == pytest.approx(amap.max(), abs=1e-5)
    assert got["score"]["data"][0] >= amap.max() - 1e-3  # the map is smoothed; the score is not

    # The log keeps the verdict and region, not the map: a replay cannot give it, and says why.
    keyed = {**headers, "Idempotency-Key": "v2-dent-4"}
    body = {"inputs": [tensor], "outputs": [{"name": "anomaly_map"}]}
    assert httpx.post(f"{base}/infer", json=body, headers=keyed, timeout=30).status_code == 200
    replay = httpx.post(f"{base}/infer", json=body, headers=keyed, timeout=30)
    assert replay.status_code == 422 and replay.json()["error"].startswith("anomaly_map_unavailable")

    # Without named outputs: everything but the map (S × S numbers per image in JSON).
    plain = httpx.post(f"{base}/infer", json={"inputs": [tensor]}, headers=headers, timeout=30)
    assert [o["name"] for o in plain.json()["outputs"]] == [
        "probs",
        "features",
        "verdict",
        "defect_type",
        "score",
    ]


def test_v2_wrong_input_shape_for_the_anomaly_model_is_a_400_naming_the_shape(anomaly_api: Api) -> None:
    before = anomaly_api.count()
    wrong = {"name": "images", "datatype": "UINT8", "shape": [1, SIZE, SIZE + 8, 3]}
    wrong["data"] = [0] * (SIZE * (SIZE + 8) * 3)
    r = httpx.post(
        f"{anomaly_api.server.base}/v2/models/{NAME}/infer",
        json={"inputs": [wrong], "outputs": [{"name": "anomaly_map"}]},
        headers=anomaly_api.headers(),
        timeout=30,
    )
    assert r.status_code == 400 and list(r.json()) == ["error"]
    assert f"[B, {SIZE}, {SIZE}, 3]" in r.json()["error"]
    assert anomaly_api.count() == before


# ---------------------------------------------------------------- a classifier has no map


def test_classifier_refuses_a_heatmap_and_keeps_its_answer_as_it_was(classifier_api: Api) -> None:
    before = classifier_api.count()
    r = classifier_api.post_image(solid(0, noise_seed=7), params={"heatmap": "true"})
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error", "detail"} and body["error"] == "heatmap_unavailable"
    assert "anomaly model" in body["detail"] and "heatmap=false" in body["detail"]
    assert classifier_api.count() == before  # refused before judging: no row
    # Without it, a classifier's answer is exactly what it always was: no anomaly key, and a
    # null defect_type (an ok part) still present.
    plain = classifier_api.post_image(solid(255, noise_seed=7))
    assert plain.status_code == 200 and plain.json()["verdict"] == "ok"
    assert set(plain.json()) == {
        "request_id",
        "part_id",
        "verdict",
        "defect_type",
        "probs",
        "model_name",
        "model_version",
        "latency_ms",
        "replayed",
    }
    base = f"{classifier_api.server.base}/v2/models/{classifier_api.model_name}"
    meta = httpx.get(base, headers=classifier_api.headers(), timeout=30).json()
    assert "anomaly_map" not in {o["name"] for o in meta["outputs"]}
    v2 = httpx.post(
        f"{base}/infer",
        json={
            "inputs": [
                {
                    "name": "images",
                    "datatype": "BYTES",
                    "shape": [1],
                    "data": [base64.b64encode(solid(0)).decode()],
                }
            ],
            "outputs": [{"name": "anomaly_map"}],
        },
        headers=classifier_api.headers(),
        timeout=30,
    )
    assert v2.status_code == 400 and "anomaly_map" in v2.json()["error"]
