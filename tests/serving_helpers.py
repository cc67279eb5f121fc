"""Helpers for the serving tests: contract ONNX models, images, keys, MLflow registration and a
real ``kensa serve`` process on 127.0.0.1."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from sqlalchemy import func, select

from kensa.store.engine import make_engine, make_session_factory

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("ok", "defect_scratch", "defect_dent")
SIZE = 32
ROLES = ("line", "operator", "data-scientist", "auditor", "admin")


def build_contract_model(
    path: Path,
    *,
    input_size: int = SIZE,
    variant: int = 0,
    t_ok: float = 0.3,
    t_defect: float = 0.7,
    lie_about_parity: bool = False,
) -> Path:
    """A small real ONNX model keeping the kensa artifact contract, in milliseconds (no torch).

    p(ok) grows with the image's mean brightness: white parts are ``ok``, black ones ``defect``,
    mid-grey (128) ones land in the review band. ``variant`` changes the file (and its hash)
    without changing verdicts. ``lie_about_parity`` writes a parity sample the graph does not
    reproduce: a corrupt model that serving must refuse.
    """
    c = len(CLASSES)
    gain = 10.0
    w = np.zeros((3, c), np.float32)
    w[:, 0] = gain / 3.0
    b = np.array([-gain / 2.0, 0.0, -1.0][:c], np.float32)
    nodes = [
        helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x"], ["m255"], axes=[1, 2], keepdims=0),
        helper.make_node("Mul", ["m255", "inv255"], ["m"]),
        helper.make_node("MatMul", ["m", "w"], ["z0"]),
        helper.make_node("Add", ["z0", "b"], ["z"]),
        helper.make_node("Softmax", ["z"], ["probs"], axis=1),
        helper.make_node("MatMul", ["m", "proj"], ["features"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(1 / 255.0, np.float32), "inv255"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(b, "b"),
        numpy_helper.from_array(np.eye(3, dtype=np.float32), "proj"),
    ]
    graph = helper.make_graph(
        nodes,
        "kensa_contract",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", input_size, input_size, 3])],
        [
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", c]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 3]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="kensa")
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    sample = np.random.default_rng(1234).integers(0, 256, (4, input_size, input_size, 3), dtype=np.uint8)
    probs = sess.run(["probs"], {"images": sample})[0].astype(np.float64)
    if lie_about_parity:
        probs = probs[:, ::-1].copy()
    meta = {
        "kensa_format": "kensa-onnx/1",
        "model_name": "contract",
        "classes": list(CLASSES),
        "input_size": input_size,
        "input_layout": "NHWC uint8 RGB",
        "thresholds": {"t_ok": t_ok, "t_defect": t_defect},
        "feature_dims": 3,
        "training_config": {"variant": variant},
        "parity_sample": {"seed": 1234, "n": 4, "probs": np.round(probs, 6).tolist(), "atol": 1e-3},
    }
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = json.dumps(value, sort_keys=True)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def encode(pixels: np.ndarray, fmt: str = "PNG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(buf, format=fmt, **kw)
    return buf.getvalue()


def solid(value: int, size: int = 48, fmt: str = "PNG", noise_seed: int | None = None) -> bytes:
    """An encoded image of one grey level (optionally with ±2 noise so each image is distinct)."""
    arr = np.full((size, size, 3), value, np.int16)
    if noise_seed is not None:
        arr += np.random.default_rng(noise_seed).integers(-2, 3, arr.shape, dtype=np.int16)
    return encode(np.clip(arr, 0, 255).astype(np.uint8), fmt)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_keys(store_url: str, roles: Iterable[str] = ROLES) -> dict[str, str]:
    """One fresh API key per role, made directly in the store (migrated first)."""
    from kensa.store.engine import make_engine, make_session_factory
    from kensa.store.keys import create_key
    from kensa.store.migrate import upgrade

    upgrade(store_url)
    engine = make_engine(store_url)
    keys = {}
    with make_session_factory(engine)() as session:
        for role in roles:
            keys[role], _ = create_key(session, f"test-{role}", role)
        session.commit()
    engine.dispose()
    return keys


def register(tracking_uri: str, name: str, onnx_path: Path, *, sha256: str | None = None) -> str:
    """Register ``onnx_path`` as flows do (log_model, sha256 tag of the file); its version."""
    import mlflow
    from mlflow import MlflowClient

    from kensa.registry import MODEL_ARTIFACT, TAG_SHA256
    from kensa.serving.inference.artifact import file_sha256

    # log_model works on MLflow's process-global URIs; restore them for the tests that follow.
    previous = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        # Artifacts beside the tracking database (MLflow's default is ./mlruns in the cwd).
        db_path = Path(tracking_uri.removeprefix("sqlite:///"))
        experiment = "serving-tests"
        client = MlflowClient()
        found = client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id
            if found
            else client.create_experiment(
                experiment, artifact_location=(db_path.parent / "mlartifacts").as_uri()
            )
        )
        with mlflow.start_run(experiment_id=experiment_id):
            info = mlflow.onnx.log_model(
                onnx.load(str(onnx_path)),
                name=MODEL_ARTIFACT,
                registered_model_name=name,
                save_as_external_data=False,
            )
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    version = str(info.registered_model_version)
    MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).set_model_version_tag(
        name, version, TAG_SHA256, sha256 or file_sha256(onnx_path)
    )
    return version


def set_champion(tracking_uri: str, name: str, version: str) -> None:
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).set_registered_model_alias(
        name, "champion", version
    )


class Server:
    """``python -m kensa.cli.serve`` as a child process on 127.0.0.1, with its own env and log."""

    def __init__(
        self,
        data_dir: Path,
        store_url: str,
        *,
        model: Path | None = None,
        env: dict[str, str] | None = None,
        mlflow_uri: str | None = None,
    ) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / f"serve-{self.port}.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("KENSA_")},
            "KENSA_DATA_DIR": str(data_dir),
            "KENSA_STORE_URL": store_url,
            "KENSA_HOST": "127.0.0.1",
            "KENSA_PORT": str(self.port),
            "KENSA_LOG_LEVEL": "INFO",
            "KENSA_DRAIN_S": "0.2",
            **({"KENSA_MLFLOW_TRACKING_URI": mlflow_uri} if mlflow_uri else {}),
            **(env or {}),
        }
        self.args = [sys.executable, "-m", "kensa.cli.serve"] + (["--model", str(model)] if model else [])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> Server:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.args, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(f"{self.base}/v2/health/ready", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.proc.kill()  # never leave a stray server behind
        self.proc.wait(10)
        raise RuntimeError(f"server not ready in {timeout} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


@dataclass
class Api:
    server: Server
    keys: dict[str, str]
    store_url: str
    data_dir: Path
    model_name: str

    def headers(self, role: str = "line", **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}", **extra}

    def post_image(self, data: bytes, media: str = "image/png", **kw: Any) -> httpx.Response:
        headers = self.headers(**{"content-type": media}, **kw.pop("headers", {}))
        return httpx.post(f"{self.server.base}/v1/inspect", content=data, headers=headers, timeout=30, **kw)

    def count(self, model: type | None = None) -> int:
        from kensa.store.models import Prediction

        engine = make_engine(self.store_url)
        try:
            with make_session_factory(engine)() as s:
                table = model or Prediction
                return int(s.scalar(select(func.count()).select_from(table)) or 0)
        finally:
            engine.dispose()

    def rows(self, **where: Any) -> list[Any]:
        from kensa.store.models import Prediction

        engine = make_engine(self.store_url)
        try:
            with make_session_factory(engine)() as s:
                q = select(Prediction)
                for k, v in where.items():
                    q = q.where(getattr(Prediction, k) == v)
                return list(s.scalars(q).all())
        finally:
            engine.dispose()


def serve_api(root: Path, name: str = "qc-line") -> Iterator[Api]:
    """A module's server: contract model, SQLite store, a key per role, 256 KiB body limit.

    Stops it afterwards and checks its log: no traceback, no API key.
    """
    model = build_contract_model(root / f"{name}.onnx")
    url = f"sqlite:///{root / 'kensa.db'}"
    keys = make_keys(url)
    env = {"KENSA_SAMPLE_RATE": "0", "KENSA_MAX_BODY_BYTES": "262144"}
    server = Server(root, url, model=model, env=env).start()
    yield Api(server, keys, url, root, name)
    assert server.stop() in (0, -15), server.log()[-2000:]
    log = server.log()
    assert "Traceback" not in log, log[-4000:]
    assert not any(key in log for key in keys.values())  # keys never reach the logs
