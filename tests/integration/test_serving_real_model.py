"""A model trained and exported by the model core, served as-is: the ONNX contract end to end."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from serving_helpers import Server, make_keys

from kensa.models.data.ingest import load_dataset
from kensa.models.data.parts import load_image
from kensa.models.evaluation.qc import verdicts
from kensa.models.onnx.export import export_run, read_metadata

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_exported_model_served_over_v1_and_v2_matches_onnxruntime(
    trained_run: Path, tiny_line: Path, tmp_path: Path
) -> None:
    onnx_path = export_run(trained_run, tmp_path / "mobilenet.onnx").path
    meta = read_metadata(onnx_path)
    classes, size, band = meta["classes"], meta["input_size"], meta["thresholds"]
    records = load_dataset(tiny_line).split("test")[:12]
    # What the model says about these parts, straight from onnxruntime (no HTTP, no serving code).
    pixels = np.stack([load_image(r.absolute_path, size).permute(1, 2, 0).numpy() for r in records])
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    expected_probs = session.run(["probs"], {"images": pixels})[0].astype(np.float64)
    expected, _ = verdicts(expected_probs, classes, band["t_ok"], band["t_defect"])

    store = f"sqlite:///{tmp_path / 'kensa.db'}"
    keys = make_keys(store, ["line"])
    server = Server(tmp_path, store, model=onnx_path).start()
    headers = {"Authorization": f"Bearer {keys['line']}"}
    try:
        got = []
        for record, want in zip(records, expected_probs, strict=True):
            data = record.absolute_path.read_bytes()
            media = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"
            r = httpx.post(
                f"{server.base}/v1/inspect",
                content=data,
                timeout=30,
                headers={**headers, "content-type": media},
                params={"part_id": record.part_id},
            )
            assert r.status_code == 200, r.text
            body = r.json()
            got.append(body["verdict"])
            assert np.allclose([body["probs"][c] for c in classes], want, atol=1e-4)
            assert body["model_name"] == "mobilenet" and body["model_version"].startswith("file:")
        assert got == list(expected)
        payload = {
            "inputs": [
                {
                    "name": "images",
                    "shape": [len(records)],
                    "datatype": "BYTES",
                    "data": [base64.b64encode(r.absolute_path.read_bytes()).decode() for r in records],
                }
            ]
        }
        r = httpx.post(f"{server.base}/v2/models/mobilenet/infer", json=payload, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        outputs = {o["name"]: o for o in r.json()["outputs"]}
        assert outputs["verdict"]["data"] == list(expected)
        assert outputs["features"]["shape"] == [len(records), meta["feature_dims"]]
    finally:
        server.stop()
