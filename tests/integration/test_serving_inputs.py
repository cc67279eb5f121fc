"""Bad inputs get a 4xx JSON error naming the problem, never a 5xx, and log nothing; schemathesis
over the OpenAPI spec finds no 5xx. One real ``kensa serve`` on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from serving_helpers import CLASSES, SIZE, Api, Server, encode, make_keys, serve_api

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    yield from serve_api(tmp_path_factory.mktemp("serving-inputs"))


# ---------------------------------------------------------------- bad inputs: 4xx JSON, no rows


def _png_declaring(width: int, height: int) -> bytes:
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>'
PDF = b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
HTML = b"<!DOCTYPE html><html><body><img src=x></body></html>"
TEXT = b"part 17, line 3: looks fine to me\n"


def _bad_requests(api: Api) -> list[tuple[str, Any, int, str]]:
    """(case, request thunk, expected status, a word the error must name)."""
    base = api.server.base
    jpeg = encode(np.full((64, 64, 3), 200, np.uint8), "JPEG")

    def raw(data: bytes, media: str) -> Any:
        return lambda: httpx.post(
            f"{base}/v1/inspect",
            content=data,
            headers=api.headers(**{"content-type": media}),
            timeout=30,
        )

    def upload(data: bytes, field: str = "image", media: str = "image/png") -> Any:
        return lambda: httpx.post(
            f"{base}/v1/inspect",
            files={field: ("f", data, media)},
            headers=api.headers(),
            timeout=30,
        )

    def chunked(total: int) -> Any:
        def body() -> Iterator[bytes]:
            for _ in range(total // 16384):
                yield b"\0" * 16384

        return lambda: httpx.post(
            f"{base}/v1/inspect",
            content=body(),
            headers=api.headers(**{"content-type": "image/png"}),
            timeout=30,
        )

    def v2(payload: Any) -> Any:
        return lambda: httpx.post(
            f"{base}/v2/models/{api.model_name}/infer",
            json=payload,
            headers=api.headers(),
            timeout=30,
        )

    good = np.zeros((1, SIZE, SIZE, 3), np.uint8).flatten().tolist()
    over = 300 * 1024  # the server's limit is 256 KiB
    return [
        ("zero-byte body", raw(b"", "image/png"), 400, "empty"),
        ("zero-byte upload", upload(b""), 400, "empty"),
        ("truncated JPEG", raw(jpeg[: len(jpeg) // 2], "image/jpeg"), 422, "truncated"),
        ("text file as image", upload(TEXT, media="text/plain"), 415, "text"),
        ("text body", raw(TEXT, "text/plain"), 415, "text/plain"),
        ("SVG as image", upload(SVG, media="image/svg+xml"), 415, "SVG"),
        ("SVG body", raw(SVG, "image/svg+xml"), 415, "image/svg+xml"),
        ("PDF as image", upload(PDF, media="application/pdf"), 415, "PDF"),
        ("HTML as image", upload(HTML, media="text/html"), 415, "HTML"),
        ("HTML sent as image/png", raw(HTML, "image/png"), 415, "HTML"),
        ("50,000 x 50,000 PNG", raw(_png_declaring(50_000, 50_000), "image/png"), 422, "pixels"),
        ("body over the limit", raw(b"\0" * over, "image/png"), 413, "bytes"),
        ("chunked body over the limit", chunked(over), 413, "bytes"),
        ("wrong form field", upload(jpeg, field="file"), 422, "'image'"),
        (
            "v2 wrong shape",
            v2(
                {
                    "inputs": [
                        {
                            "name": "images",
                            "shape": [1, SIZE, SIZE, 4],
                            "datatype": "UINT8",
                            "data": good,
                        }
                    ]
                }
            ),
            400,
            "shape",
        ),
        (
            "v2 wrong datatype",
            v2(
                {
                    "inputs": [
                        {
                            "name": "images",
                            "shape": [1, SIZE, SIZE, 3],
                            "datatype": "FP32",
                            "data": good,
                        }
                    ]
                }
            ),
            400,
            "datatype",
        ),
        (
            "v2 too few values",
            v2(
                {
                    "inputs": [
                        {
                            "name": "images",
                            "shape": [1, SIZE, SIZE, 3],
                            "datatype": "UINT8",
                            "data": good[:10],
                        }
                    ]
                }
            ),
            400,
            "values",
        ),
        (
            "v2 PDF in BYTES",
            v2(
                {
                    "inputs": [
                        {
                            "name": "images",
                            "shape": [1],
                            "datatype": "BYTES",
                            "data": [base64.b64encode(PDF).decode()],
                        }
                    ]
                }
            ),
            415,
            "PDF",
        ),
        (
            "v2 not JSON",
            lambda: httpx.post(
                f"{base}/v2/models/{api.model_name}/infer",
                content=b"{oops",
                headers=api.headers(),
                timeout=30,
            ),
            400,
            "JSON",
        ),
    ]


def test_bad_inputs_get_4xx_json_naming_the_problem_and_log_nothing(api: Api) -> None:
    before = api.count()
    failures = []
    for case, send, status, word in _bad_requests(api):
        r = send()
        body = r.json()
        text = json.dumps(body)
        ok = r.status_code == status and "error" in body and word.lower() in text.lower()
        if "/v2/" not in str(r.url):
            ok = ok and set(body) == {"error", "detail"}
        else:
            ok = ok and set(body) == {"error"}  # the Open Inference Protocol's error body
        if not ok:
            failures.append(f"{case}: {r.status_code} {text}")
        assert r.status_code < 500, f"{case}: {r.status_code} {text}"
        assert "Traceback" not in text and "/work/" not in text and ".py" not in text
    assert not failures, "\n".join(failures)
    assert api.count() == before  # not one prediction row from a bad input


# ---------------------------------------------------------------- the model's own image recipe

RECIPE_SIZE = 128


def _letterbox_model(path: Path) -> Path:
    """A tiny torch model exported the way kensa exports a run, its recipe (letterbox) recorded.

    Its logits are a random linear map of every input pixel, so any pixel serving decodes
    differently from training moves its probabilities.
    """
    import torch
    from torch import nn

    from kensa.models.onnx.export import build_metadata, export_onnx_file, parity_sample_metadata
    from kensa.models.train.trainer import LoadedModel, TrainConfig

    torch.manual_seed(0)
    n_in = 3 * RECIPE_SIZE * RECIPE_SIZE
    net = nn.Sequential(nn.Flatten(), nn.Linear(n_in, len(CLASSES))).eval()
    with torch.no_grad():
        net[1].weight.normal_(0.0, 3.0 / n_in**0.5)
        net[1].bias.zero_()
    config = vars(TrainConfig(image_size=RECIPE_SIZE))  # the default recipe: letterbox
    loaded = LoadedModel(net, "tiny-linear", list(CLASSES), RECIPE_SIZE, config, "test", path.parent, {})
    metadata = build_metadata(loaded, {"t_ok": 0.3, "t_defect": 0.7}, pca_dims=len(CLASSES))
    metadata["parity_sample"] = parity_sample_metadata(net, RECIPE_SIZE)
    pca = (torch.zeros(len(CLASSES)), torch.eye(len(CLASSES)))
    return export_onnx_file(net, RECIPE_SIZE, path, metadata, pca)


def _photo_jpeg() -> bytes:
    """A 300 × 180 part photo (non-square, textured), JPEG quality 90."""
    from PIL import Image, ImageDraw

    yy, xx = np.mgrid[0:180, 0:300]
    base = np.stack([(xx * 7) % 256, (yy * 5) % 256, ((xx + yy) * 3) % 256], axis=2).astype(np.uint8)
    img = Image.fromarray(base // 2 + 40, "RGB")
    ImageDraw.Draw(img).ellipse((105, 45, 195, 135), fill=(250, 250, 250))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_a_served_model_sees_exactly_the_pixels_training_saw(tmp_path: Path) -> None:
    """A JPEG request gets the probabilities of the ONNX model on the training-path pixels."""
    import onnxruntime as ort
    from PIL import Image

    from kensa.models.data.imageprep import Preprocess
    from kensa.models.data.parts import load_image
    from kensa.models.onnx.contract import read_metadata, read_preprocess

    model = _letterbox_model(tmp_path / "letterbox.onnx")
    recipe = read_preprocess(read_metadata(model))
    assert recipe == Preprocess(RECIPE_SIZE, "letterbox")
    jpeg = _photo_jpeg()
    part = tmp_path / "part.jpg"
    part.write_bytes(jpeg)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])

    def probs(pixels: np.ndarray) -> np.ndarray:
        return np.asarray(sess.run(["probs"], {"images": pixels[None]})[0][0], dtype=np.float64)

    want = probs(load_image(part, recipe).permute(1, 2, 0).numpy())  # kensa's training path
    # The pixels other recipes would give move the probabilities far more than the tolerance,
    # so agreement below means serving decoded exactly as training did.
    squashed = probs(load_image(part, RECIPE_SIZE).permute(1, 2, 0).numpy())
    undrafted = probs(recipe.prepare(Image.open(io.BytesIO(jpeg)).convert("RGB")))
    assert np.abs(squashed - want).max() > 1e-3 and np.abs(undrafted - want).max() > 1e-4

    url = f"sqlite:///{tmp_path / 'kensa.db'}"
    keys = make_keys(url, ["line"])
    server = Server(tmp_path, url, model=model, env={"KENSA_SAMPLE_RATE": "0"}).start()
    try:
        r = httpx.post(
            f"{server.base}/v1/inspect",
            content=jpeg,
            headers={"Authorization": f"Bearer {keys['line']}", "content-type": "image/jpeg"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        got = np.array([r.json()["probs"][c] for c in CLASSES])
        assert np.abs(got - want).max() < 1e-5, (got, want)
    finally:
        assert server.stop() in (0, -15), server.log()[-2000:]
    assert "Traceback" not in server.log()


# ---------------------------------------------------------------- schemathesis: no 5xx anywhere

schemathesis = pytest.importorskip("schemathesis")


def test_schemathesis_finds_no_server_error(api: Api) -> None:
    """Cases generated from the OpenAPI spec, valid and invalid, for every operation: no 5xx."""
    from hypothesis import HealthCheck, given
    from hypothesis import settings as hypothesis_settings

    schema = schemathesis.openapi.from_url(f"{api.server.base}/openapi.json", headers=api.headers("admin"))
    server_errors: list[str] = []
    statuses: list[int] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 11
    for operation in operations:
        # schemathesis' own pytest plugin does not run under this pytest; drive Hypothesis directly.
        @given(case=operation.as_strategy())
        @hypothesis_settings(
            max_examples=30,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            response = case.call(headers=api.headers("admin"), timeout=30)
            statuses.append(response.status_code)
            if response.status_code >= 500:
                server_errors.append(
                    f"{case.method} {case.path}: {response.status_code} {response.text[:200]}"
                )

        run()
    assert len(statuses) >= 5 * len(operations)  # Hypothesis really sent cases
    assert not server_errors, "\n".join(server_errors[:10])
