"""Serving's parts on their own: decoding and its guards, model verification, policy, v2 parsing."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from serving_helpers import SIZE, build_contract_model, encode, make_keys

from kensa.serving.errors import ApiError, error_body
from kensa.serving.inference.artifact import ModelRefused, file_sha256, parity_images
from kensa.serving.inference.decode import decode_image, sniff_format
from kensa.serving.inference.engine import (
    CPU,
    HEAVY_MODEL_MS_PER_IMAGE,
    candidate_providers,
    choose_runners,
    load_model,
)
from kensa.serving.inference.imagestats import image_stats
from kensa.serving.inference.predlog import is_sampled
from kensa.serving.routes.v2codec import parse_infer

# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize(
    ("data", "status", "word"),
    [
        (b"", 400, "empty"),
        (b"%PDF-1.4 ...", 415, "PDF"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", 415, "SVG"),
        (b"<!doctype html><html></html>", 415, "HTML"),
        (b"hello, I am a text file", 415, "text"),
        (b"GIF89a....", 415, "GIF"),
        (b"\x00\x01\x02\xff" * 10, 415, "unknown"),
    ],
)
def test_sniff_refuses_what_is_not_jpeg_png_or_bmp(data: bytes, status: int, word: str) -> None:
    with pytest.raises(ApiError) as err:
        sniff_format(data)
    assert err.value.status == status and word.lower() in err.value.detail.lower()
    assert "JPEG, PNG or BMP" in err.value.detail or status == 400


def test_decode_resizes_to_the_model_input_and_matches_training_preprocessing() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)
    png = encode(arr, "PNG")
    decoded = decode_image(png, SIZE, 10_000)
    assert decoded.pixels.shape == (SIZE, SIZE, 3) and decoded.pixels.dtype == np.uint8
    # The same recipe as kensa.models.data.parts.load_image: RGB, bilinear square resize.
    want = np.asarray(Image.fromarray(arr).resize((SIZE, SIZE), Image.Resampling.BILINEAR))
    assert np.array_equal(decoded.pixels, want)
    assert (decoded.width, decoded.height, decoded.format) == (70, 90, "PNG")


def test_jpeg_draft_mode_and_palette_and_grey_images_decode() -> None:
    big = np.full((1024, 1024, 3), 180, np.uint8)
    assert decode_image(encode(big, "JPEG"), 224, 40_000_000).pixels.shape == (224, 224, 3)
    for mode in ("L", "P", "RGBA"):
        buf = io.BytesIO()
        Image.new(mode, (40, 40)).save(buf, format="PNG")
        assert decode_image(buf.getvalue(), SIZE, 10_000).pixels.shape == (SIZE, SIZE, 3)


def test_pixel_limit_is_checked_from_the_header_and_truncation_is_a_422() -> None:
    png = encode(np.zeros((200, 200, 3), np.uint8), "PNG")
    with pytest.raises(ApiError) as err:
        decode_image(png, SIZE, max_pixels=100 * 100)
    assert err.value.code == "too_many_pixels" and "200 × 200" in err.value.detail
    jpeg = encode(np.zeros((64, 64, 3), np.uint8), "JPEG")
    with pytest.raises(ApiError) as err:
        decode_image(jpeg[:200], SIZE, 10_000)
    assert err.value.status == 422 and err.value.code == "undecodable_image"


def test_image_stats_describe_what_the_model_sees() -> None:
    black = image_stats(np.zeros((16, 16, 3), np.uint8))
    assert black["brightness"] == 0 and black["contrast"] == 0 and black["sharpness"] == 0
    checker = (np.indices((16, 16)).sum(0) % 2 * 255).astype(np.uint8)
    sharp = image_stats(np.repeat(checker[..., None], 3, axis=2))
    assert sharp["sharpness"] > 1000 and 120 < sharp["brightness"] < 135
    reddish = image_stats(
        np.dstack([np.full((8, 8), 200), np.full((8, 8), 100), np.full((8, 8), 50)]).astype(np.uint8)
    )
    assert reddish["rg_ratio"] == pytest.approx(2.0) and reddish["bg_ratio"] == pytest.approx(0.5)


def test_sampling_is_by_hash_and_close_to_the_rate() -> None:
    import hashlib

    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000)]
    kept = [s for s in shas if is_sampled(s, 0.1)]
    assert 0.08 < len(kept) / len(shas) < 0.12
    assert kept == [s for s in shas if is_sampled(s, 0.1)]
    assert not any(is_sampled(s, 0.0) for s in shas) and all(is_sampled(s, 1.0) for s in shas)


# ---------------------------------------------------------------- model verification


def test_parity_images_follow_the_export_recipe() -> None:
    from kensa.models.onnx.export import PARITY_SAMPLE_SEED, PARITY_SAMPLE_SHAPE, parity_sample_images

    assert np.array_equal(
        parity_images(PARITY_SAMPLE_SEED, PARITY_SAMPLE_SHAPE, 24), parity_sample_images(24)
    )


def test_a_good_model_is_verified_on_cpu_with_no_gpu_noise(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = build_contract_model(tmp_path / "m.onnx")
    model = load_model(path, name="m", version="1", expected_sha256=file_sha256(path), max_batch=8)
    assert model.provider == CPU and model.precision == "fp32" and candidate_providers()[-1] == CPU
    probs, features = model.run(np.full((2, SIZE, SIZE, 3), 255, np.uint8))
    assert probs.shape == (2, 3) and features.shape == (2, 3) and probs[0, 0] > 0.9
    out = capfd.readouterr()
    assert "EP Error" not in out.out + out.err and "CUDA" not in out.err


def test_runners_come_from_the_warm_up_timing_unless_configured(tmp_path: Path) -> None:
    # A model slower than decoding and answering gets two batches in flight; a light one, one.
    assert choose_runners(HEAVY_MODEL_MS_PER_IMAGE * 3) == 2
    assert choose_runners(HEAVY_MODEL_MS_PER_IMAGE / 3) == 1
    assert choose_runners(HEAVY_MODEL_MS_PER_IMAGE * 3, configured=1) == 1
    assert choose_runners(0.1, configured=3) == 3
    path = build_contract_model(tmp_path / "m.onnx")
    light = load_model(path, name="m", version="1", expected_sha256=None, max_batch=8)
    assert 0 < light.warmup_ms_per_image < HEAVY_MODEL_MS_PER_IMAGE and light.runners == 1
    assert light.describe()["runners"] == 1
    pinned = load_model(path, name="m", version="1", expected_sha256=None, max_batch=8, runners=2)
    assert pinned.runners == 2


def _batches_in_flight(tmp_path: Path, runners: int) -> tuple[int, int]:
    """Push 24 images through a real Batcher on the contract model, each batch's inference
    slowed to 50 ms; return (most batches in inference at once, images answered)."""
    import asyncio
    import threading
    import time
    from dataclasses import dataclass

    from kensa.serving.inference.batcher import Batcher, BatchResult, Job
    from kensa.serving.inference.decode import decode_image
    from kensa.serving.inference.engine import ServedModel

    path = build_contract_model(tmp_path / f"m{runners}.onnx")
    base = load_model(path, name="m", version="1", expected_sha256=None, max_batch=4)
    lock = threading.Lock()
    seen = {"now": 0, "most": 0}

    @dataclass
    class Slow(ServedModel):
        def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            with lock:
                seen["now"] += 1
                seen["most"] = max(seen["most"], seen["now"])
            time.sleep(0.05)
            try:
                return super().run(images)
            finally:
                with lock:
                    seen["now"] -= 1

    model = Slow(**{**vars(base), "runners": runners})
    image = decode_image(encode(np.full((SIZE, SIZE, 3), 200, np.uint8)), SIZE, 10**6)
    answered = []

    async def finish(result: BatchResult) -> None:
        for job, probs in zip(result.jobs, result.probs, strict=True):
            answered.append(probs)
            job.future.set_result(probs)

    async def main() -> None:
        batcher = Batcher(
            max_batch_size=4,
            max_wait_ms=1,
            queue_size=64,
            current_model=lambda: model,
            finish=finish,
        )
        batcher.start()
        loop = asyncio.get_running_loop()
        jobs = [
            Job(image, lambda s: image.pixels, None, time.perf_counter(), loop.create_future())
            for _ in range(24)
        ]
        for job in jobs:
            batcher.submit(job)
        await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), 30)
        await batcher.drain(5)
        await batcher.close()

    asyncio.run(main())
    return seen["most"], len(answered)


def test_a_heavy_model_runs_two_batches_at_once_and_a_light_one_one(tmp_path: Path) -> None:
    assert _batches_in_flight(tmp_path, runners=2) == (2, 24)
    assert _batches_in_flight(tmp_path, runners=1) == (1, 24)


def _refusal(path: Path, sha: str | None = None) -> ModelRefused:
    with pytest.raises(ModelRefused) as err:
        load_model(path, name="m", version="x", expected_sha256=sha, max_batch=4)
    return err.value


def test_each_verification_step_refuses_its_kind_of_bad_model(tmp_path: Path) -> None:
    good = build_contract_model(tmp_path / "good.onnx")
    assert _refusal(good, sha="0" * 64).step == "sha256"
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[:300])
    assert _refusal(truncated).step == "checker"
    liar = build_contract_model(tmp_path / "liar.onnx", lie_about_parity=True)
    refused = _refusal(liar, sha=file_sha256(liar))
    assert refused.step == "parity" and "changed verdicts" in refused.reason
    proto = onnx.load(str(good))  # a float input: not the uint8 NHWC contract
    proto.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    onnx.save(proto, str(tmp_path / "float.onnx"))
    assert _refusal(tmp_path / "float.onnx").step in ("signature", "checker")
    proto = onnx.load(str(good))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "nometa.onnx"))
    assert _refusal(tmp_path / "nometa.onnx").step == "metadata"


# ---------------------------------------------------------------- v2 parsing and error bodies


def test_v2_parse_accepts_nested_and_flat_uint8_and_base64_bytes() -> None:
    images = np.arange(2 * 4 * 4 * 3, dtype=np.int64).reshape(2, 4, 4, 3) % 256
    for data in (images.tolist(), images.flatten().tolist()):
        body = json.dumps(
            {"inputs": [{"name": "images", "shape": [2, 4, 4, 3], "datatype": "UINT8", "data": data}]}
        ).encode()
        parsed = parse_infer(body, None, 4)
        assert parsed.tensor is not None and np.array_equal(parsed.tensor, images.astype(np.uint8))
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "shape": [1],
                    "datatype": "BYTES",
                    "data": [base64.b64encode(b"abc").decode()],
                }
            ]
        }
    ).encode()
    assert parse_infer(body, None, 4).encoded == [b"abc"]


@pytest.mark.parametrize(
    ("doc", "word"),
    [
        ({"inputs": []}, "exactly one"),
        (
            {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": []}]},
            "unknown input",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "images",
                        "shape": [1, 4, 4, 3],
                        "datatype": "UINT8",
                        "data": [300] * 48,
                    }
                ]
            },
            "0–255",
        ),
        (
            {"inputs": [{"name": "images", "shape": [1, 5, 4, 3], "datatype": "UINT8", "data": [0] * 60}]},
            "shape",
        ),
        (
            {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["!!"]}]},
            "base64",
        ),
        (
            {"inputs": [{"name": "images", "shape": [1], "datatype": "INT64", "data": [1]}]},
            "datatype",
        ),
        (
            {
                "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": ["YQ=="]}],
                "outputs": [{"name": "logits"}],
            },
            "unknown outputs",
        ),
    ],
)
def test_v2_parse_errors_name_the_problem(doc: dict[str, object], word: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_infer(json.dumps(doc).encode(), None, 4)
    assert err.value.status == 400 and word in err.value.detail


def test_error_bodies_follow_each_protocol() -> None:
    assert error_body("/v1/inspect", "x", "why") == {"error": "x", "detail": "why"}
    assert error_body("/v2/models/m/infer", "x", "why") == {"error": "x: why"}


# ---------------------------------------------------------------- policy: none means denied


@pytest.mark.filterwarnings("ignore:Using `httpx`")
def test_every_route_has_a_policy_and_a_route_without_one_is_denied(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from kensa.serving.app import create_app
    from kensa.serving.security.auth import POLICY, PUBLIC
    from kensa.settings import Settings

    store = f"sqlite:///{tmp_path / 'kensa.db'}"
    keys = make_keys(store, ["admin"])
    app = create_app(
        Settings(data_dir=tmp_path, store_url=store),
        model_file=build_contract_model(tmp_path / "m.onnx"),
    )
    paths = {(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops}
    assert paths <= set(POLICY) | PUBLIC
    assert set(POLICY) | PUBLIC <= paths | {("GET", "/openapi.json")}  # no stale entries

    @app.get("/v1/forgotten")  # a route someone added without deciding who may call it
    async def forgotten() -> dict[str, str]:
        return {"secret": "yes"}

    with TestClient(app) as client:
        r = client.get("/v1/forgotten", headers={"Authorization": f"Bearer {keys['admin']}"})
    assert r.status_code == 403 and "no policy" in r.json()["detail"]
