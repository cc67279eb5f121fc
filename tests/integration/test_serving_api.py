"""The inference service over HTTP: v1 and v2 round trips, idempotency, metrics.

One real ``kensa serve`` process on 127.0.0.1 (SQLite store) serves a small contract model whose
verdict follows brightness: white parts are ok, black ones defect, mid-grey ones go to review.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from serving_helpers import CLASSES, SIZE, Api, encode, serve_api, solid
from sqlalchemy import select

from kensa.store.engine import make_engine, make_session_factory
from kensa.store.models import ReviewItem

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    yield from serve_api(tmp_path_factory.mktemp("serving-api"))


# ---------------------------------------------------------------- v1 round trips


@pytest.mark.parametrize(("grey", "verdict"), [(255, "ok"), (0, "defect"), (128, "review")])
def test_v1_verdict_round_trip_is_logged_before_the_answer(api: Api, grey: int, verdict: str) -> None:
    r = api.post_image(
        solid(grey, noise_seed=grey),
        params={"part_id": f"p-{grey}", "line_id": "L1", "camera_id": "cam2"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["verdict"] == verdict
    assert set(body["probs"]) == set(CLASSES) and abs(sum(body["probs"].values()) - 1) < 1e-4
    assert (body["defect_type"] is None) == (verdict == "ok")
    assert body["model_name"] == api.model_name and body["model_version"].startswith("file:")
    assert body["latency_ms"] > 0 and body["part_id"] == f"p-{grey}"
    # The row was committed before the response was sent: it is there the moment we look.
    [row] = api.rows(request_id=body["request_id"])
    assert (row.verdict, row.part_id, row.line_id, row.camera_id) == (
        verdict,
        f"p-{grey}",
        "L1",
        "cam2",
    )
    assert row.model_version == body["model_version"] and row.probs == body["probs"]
    assert len(row.features or []) == 3 and row.latency_ms == body["latency_ms"]
    assert set(row.image_stats or {}) >= {"brightness", "contrast", "sharpness", "rg_ratio"}
    assert abs(row.image_stats["brightness"] - grey) < 3  # type: ignore[index]
    if verdict == "review":  # review-band images are kept, content-addressed, with a review item
        assert row.image_path and Path(row.image_path).name.startswith(row.image_sha256)
        assert Path(row.image_path).read_bytes() == solid(grey, noise_seed=grey)
        engine = make_engine(api.store_url)
        with make_session_factory(engine)() as s:
            item = s.scalar(select(ReviewItem).where(ReviewItem.prediction_id == row.id))
        engine.dispose()
        assert item is not None and item.reason == "review_band" and item.status == "open"
    else:  # sample_rate 0: nothing else is kept
        assert row.image_path is None


def test_v1_multipart_jpeg_and_bmp(api: Api) -> None:
    white = np.full((300, 200, 3), 250, np.uint8)
    for fmt, media in (("JPEG", "image/jpeg"), ("BMP", "image/bmp")):
        r = httpx.post(
            f"{api.server.base}/v1/inspect",
            headers=api.headers(),
            files={"image": (f"part.{fmt.lower()}", encode(white, fmt), media)},
            data={"part_id": f"mp-{fmt}", "line_id": "L2"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        assert r.json()["verdict"] == "ok" and r.json()["part_id"] == f"mp-{fmt}"


def test_v1_batch(api: Api) -> None:
    files = [
        ("images", (f"{i}.png", solid(g, noise_seed=100 + i), "image/png"))
        for i, g in enumerate((255, 0, 128))
    ]
    r = httpx.post(
        f"{api.server.base}/v1/inspect/batch",
        headers=api.headers(),
        files=files,
        data={"part_id": ["b0", "b1", "b2"], "line_id": "L3"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["verdict"] for x in results] == ["ok", "defect", "review"]
    assert [x["part_id"] for x in results] == ["b0", "b1", "b2"]
    assert all(len(api.rows(request_id=x["request_id"])) == 1 for x in results)


def test_v1_batch_takes_a_part_id_for_each_of_many_images(api: Api) -> None:
    n = 24  # more images than the 16 text fields a form parser allows by default
    files = [("images", (f"{i}.png", solid(255, noise_seed=300 + i), "image/png")) for i in range(n)]
    r = httpx.post(
        f"{api.server.base}/v1/inspect/batch",
        headers=api.headers(),
        files=files,
        data={"part_id": [f"many-{i}" for i in range(n)], "line_id": "L3"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert [x["part_id"] for x in r.json()["results"]] == [f"many-{i}" for i in range(n)]


# ---------------------------------------------------------------- v2 (Open Inference Protocol)


def _v2(api: Api, path: str, payload: Any = None, role: str = "line", **kw: Any) -> httpx.Response:
    url = f"{api.server.base}/v2{path}"
    if payload is None and "content" not in kw:
        return httpx.get(url, headers=api.headers(role), timeout=30)
    return httpx.post(
        url, json=payload, headers={**api.headers(role), **kw.pop("headers", {})}, timeout=30, **kw
    )


def test_v2_metadata_and_health(api: Api) -> None:
    assert httpx.get(f"{api.server.base}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{api.server.base}/v2/health/ready").status_code == 200
    meta = _v2(api, f"/models/{api.model_name}").json()
    assert meta["name"] == api.model_name and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, SIZE, SIZE, 3]}]
    assert {o["name"] for o in meta["outputs"]} == {"probs", "features", "verdict", "defect_type"}
    assert _v2(api, f"/models/{api.model_name}/ready").json() == {
        "name": api.model_name,
        "ready": True,
    }
    assert _v2(api, "").json()["extensions"] == ["binary_tensor_data"]
    missing = _v2(api, "/models/nope")
    assert missing.status_code == 404 and list(missing.json()) == ["error"]


def test_v2_infer_uint8_tensor_json(api: Api) -> None:
    images = np.stack([np.full((SIZE, SIZE, 3), g, np.uint8) for g in (255, 0)])
    payload = {
        "id": "req-1",
        "inputs": [
            {
                "name": "images",
                "shape": list(images.shape),
                "datatype": "UINT8",
                "data": images.flatten().tolist(),
            }
        ],
        "parameters": {"line_id": "L9", "part_ids": ["t0", "t1"]},
    }
    r = _v2(api, f"/models/{api.model_name}/infer", payload)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "req-1" and body["model_name"] == api.model_name
    out = {o["name"]: o for o in body["outputs"]}
    assert out["probs"]["shape"] == [2, len(CLASSES)] and out["probs"]["datatype"] == "FP32"
    assert len(out["probs"]["data"]) == 2 * len(CLASSES)
    assert out["verdict"]["data"] == ["ok", "defect"] and out["verdict"]["datatype"] == "BYTES"
    for rid, part in zip(body["parameters"]["request_ids"], ("t0", "t1"), strict=True):
        [row] = api.rows(request_id=rid)
        assert (row.part_id, row.line_id) == (part, "L9")


def test_v2_infer_bytes_tensor_base64_and_binary_extension(api: Api) -> None:
    encoded = [solid(255, noise_seed=7), solid(0, noise_seed=8)]
    payload = {
        "inputs": [
            {
                "name": "images",
                "shape": [2],
                "datatype": "BYTES",
                "data": [base64.b64encode(e).decode() for e in encoded],
            }
        ],
        "outputs": [{"name": "verdict"}],
    }
    r = _v2(api, f"/models/{api.model_name}/infer", payload)
    assert r.status_code == 200, r.text
    assert [o["name"] for o in r.json()["outputs"]] == ["verdict"]
    assert r.json()["outputs"][0]["data"] == ["ok", "defect"]
    # Triton's binary tensor extension: JSON header, then length-prefixed BYTES elements.
    blob = b"".join(struct.pack("<I", len(e)) + e for e in encoded)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "shape": [2],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        }
    ).encode()
    r = httpx.post(
        f"{api.server.base}/v2/models/{api.model_name}/infer",
        content=header + blob,
        headers={
            **api.headers(),
            "Inference-Header-Content-Length": str(len(header)),
            "content-type": "application/octet-stream",
        },
        timeout=30,
    )
    assert r.status_code == 200, r.text
    verdicts = next(o for o in r.json()["outputs"] if o["name"] == "verdict")["data"]
    assert verdicts == ["ok", "defect"]


# ---------------------------------------------------------------- idempotency


def test_concurrent_retries_with_one_key_give_exactly_one_row(api: Api) -> None:
    image = solid(255, noise_seed=4242)
    key = "line7-part-000123-attempt"

    def send(_: int) -> httpx.Response:
        return api.post_image(image, headers={"Idempotency-Key": key})

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(send, range(12)))
    assert [r.status_code for r in responses] == [200] * 12, [r.text for r in responses]
    assert len({r.json()["request_id"] for r in responses}) == 1
    assert sum(not r.json()["replayed"] for r in responses) == 1
    assert len(api.rows(idempotency_key=key)) == 1
    # A later retry replays the stored answer; the same key with another image is refused.
    again = api.post_image(image, headers={"Idempotency-Key": key})
    assert again.status_code == 200 and again.json()["replayed"] is True
    assert again.json()["request_id"] == responses[0].json()["request_id"]
    other = api.post_image(solid(0, noise_seed=1), headers={"Idempotency-Key": key})
    assert other.status_code == 422 and other.json()["error"] == "idempotency_key_reused"
    assert len(api.rows(idempotency_key=key)) == 1


# ---------------------------------------------------------------- metrics


def test_metrics_show_latency_batches_queue_verdicts_by_version_and_errors(api: Api) -> None:
    api.post_image(solid(255))
    api.post_image(b"%PDF-1.4", media="image/png")
    text = httpx.get(f"{api.server.base}/metrics", headers=api.headers("operator")).text
    info = httpx.get(f"{api.server.base}/admin/model", headers=api.headers("admin")).json()
    version = info["model_version"]
    # The contract model is light: one batch at a time, chosen from its warm-up timing.
    assert info["runners"] == 1 and info["warmup_ms_per_image"] > 0
    assert (
        f'kensa_verdicts_total{{model_name="{api.model_name}",model_version="{version}",verdict="ok"}}'
        in text
    )
    assert 'kensa_request_latency_seconds_bucket{le="0.05",route="/v1/inspect"}' in text
    assert "kensa_batch_size_bucket" in text and "kensa_queue_depth" in text
    assert 'kensa_errors_total{code="unsupported_image_format",status="415"}' in text
    assert f'kensa_model_info{{model_name="{api.model_name}",model_version="{version}"' in text
