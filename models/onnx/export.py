"""ONNX export of a trained run: uint8 NHWC in, probs and drift features out, metadata inside."""

from __future__ import annotations

import json
import os
import tempfile
import threading
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from kensa import __version__
from kensa.models.data.imageprep import preprocess_from_config
from kensa.models.data.ingest import load_dataset
from kensa.models.evaluation.qc import defect_scores, qc_metrics, verdicts
from kensa.models.nets.zoo import QCNet
from kensa.models.onnx.contract import (  # noqa: F401 - re-exported: the export side of the contract
    PARITY_SAMPLE_SEED,
    PARITY_SAMPLE_SHAPE,
    PREPROCESS_KEY,
    parity_sample_images,
    read_metadata,
    sha256_file,
)
from kensa.models.train.cpu import configure_cpu_training
from kensa.models.train.trainer import LoadedModel, load_checkpoint, split_tensors

OPSET = 17
MAX_FEATURES = 32
PARITY_ATOL = 1e-4
_EXPORT_LOCK = threading.Lock()
TIE_EPS = 1e-6  # a score this close to a threshold is a tie under float32 rounding


class ParityError(RuntimeError):
    """The exported graph does not reproduce the PyTorch model."""


class ExportGraph(nn.Module):
    """uint8 NHWC images → (probs (B, C), features (B, K)); everything serving needs is inside."""

    pca_mean: torch.Tensor
    pca_components: torch.Tensor

    def __init__(self, net: nn.Module, pca_mean: torch.Tensor, pca_components: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("pca_mean", pca_mean.float())  # (D,)
        self.register_buffer("pca_components", pca_components.float())  # (K, D)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W) in [0, 1]
        emb = embed(self.net, x)  # (B, D)
        probs = torch.softmax(head(self.net, emb), dim=1)
        features = (emb - self.pca_mean) @ self.pca_components.T  # (B, K)
        return probs, features


def embed(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The embedding of a kensa model; for any other module, its logits stand in."""
    return net.embed(x) if isinstance(net, QCNet) else net(x)


def head(net: nn.Module, emb: torch.Tensor) -> torch.Tensor:
    return net.head(emb) if isinstance(net, QCNet) else emb


@dataclass
class ExportResult:
    """Where the model went, what it promises, and the parity evidence."""

    path: Path
    sha256: str
    metadata: dict[str, str]
    parity: dict[str, Any]
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


@torch.no_grad()
def fit_pca(net: nn.Module, images: torch.Tensor, k: int = MAX_FEATURES) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA of training embeddings: mean (D,) and the top-k components (k, D)."""
    net.eval()
    embs = torch.cat(
        [embed(net, images[i : i + 64].float() / 255.0) for i in range(0, len(images), 64)]
    ).double()
    mean = embs.mean(0)
    k = max(1, min(k, embs.shape[1], len(embs) - 1))
    _, _, vh = torch.linalg.svd(embs - mean, full_matrices=False)
    return mean.float(), vh[:k].float()


def working_providers() -> list[str]:
    """Execution providers that actually initialise here, best first (CUDA only with a GPU).

    onnxruntime-gpu lists CUDA as available even without a driver and then logs errors when a
    session asks for it; a tiny probe session with errors silenced tells the truth.
    """
    global _PROVIDERS
    if _PROVIDERS is None:
        found = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers():
            ort.set_default_logger_severity(4)
            try:
                probe = _probe_model()
                opts = ort.SessionOptions()
                opts.log_severity_level = 4
                sess = ort.InferenceSession(probe, opts, providers=["CUDAExecutionProvider"])
                if "CUDAExecutionProvider" in sess.get_providers():
                    found.insert(0, "CUDAExecutionProvider")
            except Exception:  # noqa: BLE001 - any failure means "no usable CUDA here"
                pass
            finally:
                ort.set_default_logger_severity(2)
        _PROVIDERS = found
    return list(_PROVIDERS)


_PROVIDERS: list[str] | None = None


def _probe_model() -> bytes:
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]).SerializeToString()


def cpu_session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(sess: ort.InferenceSession, images_nhwc: np.ndarray, batch: int = 64) -> np.ndarray:
    outs = [
        sess.run(["probs"], {"images": images_nhwc[i : i + batch]})[0]
        for i in range(0, len(images_nhwc), batch)
    ]
    return np.concatenate(outs).astype(np.float64)


def parity_pool(calib: torch.Tensor, test: torch.Tensor, n: int) -> torch.Tensor:
    """At least ``n`` in-distribution images (calibration + test parts) to compare graphs on."""
    pool = torch.cat([calib, test])
    # Fewer than n real parts: add flipped copies, which are still in-distribution images.
    variants = [pool, pool.flip(-1), pool.flip(-2), pool.flip(-1, -2)]
    out = torch.cat(variants)
    while len(out) < n:
        out = torch.cat([out, out])
    return out[: max(n, len(pool))]


def export_onnx_file(
    net: nn.Module,
    input_size: int,
    out: Path,
    metadata: dict[str, Any],
    pca: tuple[torch.Tensor, torch.Tensor],
) -> Path:
    """Write a classifier's ONNX graph with kensa metadata to ``out`` (atomically) and check it."""
    graph = ExportGraph(net, *pca).eval()
    return write_onnx(graph, input_size, out, metadata, ["probs", "features"])


def write_onnx(
    graph: nn.Module, input_size: int, out: Path, metadata: dict[str, Any], output_names: list[str]
) -> Path:
    """Trace ``graph`` (uint8 NHWC ``images`` in, ``output_names`` out, batch dynamic) to ``out``.

    The file is written atomically with kensa's metadata and checked by ``onnx.checker``.
    """
    dummy = torch.zeros(2, input_size, input_size, 3, dtype=torch.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(suffix=".onnx", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _EXPORT_LOCK, warnings.catch_warnings():  # one export at a time: global exporter state
            # The trace is taken at the model's fixed input size (only the batch is dynamic), so
            # "converting a tensor to a Python integer" in the TF-same padding and the neck's
            # resize is exactly right; the parity check below is the proof, not these warnings.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
            torch.onnx.export(
                graph,
                (dummy,),
                str(tmp),
                # The TorchScript exporter, on purpose: since torch 2.9 the default is the
                # torch.export one (dynamo=True), which needs onnxscript, not a kensa dependency
                # (it fails with ModuleNotFoundError here). Torch warns that this exporter will
                # be removed; moving means adding onnxscript and re-checking the parity sample.
                dynamo=False,
                opset_version=OPSET,
                input_names=["images"],
                output_names=output_names,
                dynamic_axes={"images": {0: "batch"}, **{name: {0: "batch"} for name in output_names}},
            )
        proto = onnx.load(str(tmp))
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key = key
            entry.value = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        proto.producer_name = "kensa"
        proto.producer_version = __version__
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def check_parity(
    net: nn.Module,
    onnx_path: Path,
    images: torch.Tensor,
    classes: list[str],
    band: dict[str, Any],
    atol: float = PARITY_ATOL,
) -> dict[str, Any]:
    """Compare ONNX Runtime (CPU, FP32) with PyTorch eager on the same uint8 images."""
    with torch.no_grad():
        ref = (
            torch.cat(
                [torch.softmax(net(images[i : i + 64].float() / 255.0), 1) for i in range(0, len(images), 64)]
            )
            .double()
            .numpy()
        )
    got = run_onnx(cpu_session(onnx_path), images.permute(0, 2, 3, 1).contiguous().numpy())
    v_ref, _ = verdicts(ref, classes, band["t_ok"], band["t_defect"])
    v_got, _ = verdicts(got, classes, band["t_ok"], band["t_defect"])
    max_diff = float(np.abs(ref - got).max())
    # A part whose score sits within float32 rounding of a threshold has no well-defined verdict
    # (the same graph on another CPU could flip it); such ties are counted, not compared.
    s_ref = defect_scores(ref, classes)
    tie = (np.abs(s_ref - band["t_ok"]) < TIE_EPS) | (np.abs(s_ref - band["t_defect"]) < TIE_EPS)
    decided = ~tie
    agreement = float((v_ref[decided] == v_got[decided]).mean()) if decided.any() else 1.0
    return {
        "n_images": len(images),
        "max_abs_prob_diff": max_diff,
        "tolerance": atol,
        "verdict_agreement": agreement,
        "threshold_ties": int(tie.sum()),
        "passed": bool(max_diff <= atol and agreement == 1.0),
    }


def parity_sample_metadata(net: nn.Module, input_size: int) -> dict[str, Any]:
    """The parity sample's expected probabilities, computed by the source model (PyTorch eager).

    Serving regenerates the noise images from (seed, n) and refuses a file whose graph no longer
    gives these probabilities.
    """
    sample = parity_sample_images(input_size)
    with torch.no_grad():
        sample_probs = torch.softmax(net(torch.from_numpy(sample).permute(0, 3, 1, 2).float() / 255.0), 1)
    return {
        "seed": PARITY_SAMPLE_SEED,
        "n": PARITY_SAMPLE_SHAPE,
        "probs": np.round(sample_probs.numpy().astype(np.float64), 6).tolist(),
        "atol": 1e-3,
    }


def export_run(
    run_dir: Path,
    out: Path,
    fp16: bool = False,
    int8: bool = False,
    parity_images: int = 256,
    variant_tolerance: float = 0.01,
) -> ExportResult:
    """Export a trained, evaluated run to ONNX with its band, PCA features and a parity report.

    The band comes from ``run_dir/band.json`` (written by ``kensa evaluate``): thresholds are a
    governed artifact, so export never invents them. Raises :class:`ParityError` (and removes the
    file) when the graph does not reproduce PyTorch.
    """
    band_path = run_dir / "band.json"
    if not band_path.is_file():
        msg = f"{band_path} is missing; run `kensa evaluate {run_dir}` first to calibrate the band"
        raise FileNotFoundError(msg)
    band = json.loads(band_path.read_text())
    configure_cpu_training()  # the PCA and parity passes: threads and allocator as in training
    return export_loaded(
        load_checkpoint(run_dir),
        band,
        out,
        fp16=fp16,
        int8=int8,
        parity_images=parity_images,
        variant_tolerance=variant_tolerance,
    )


def export_loaded(
    loaded: LoadedModel,
    band: dict[str, Any],
    out: Path,
    fp16: bool = False,
    int8: bool = False,
    parity_images: int = 256,
    variant_tolerance: float = 0.01,
) -> ExportResult:
    """Export any loaded model (a kensa run or a data scientist's own module) with parity.

    ``band`` is the calibrated review band (``band.json``) the model was evaluated with.
    """
    ds = load_dataset(loaded.dataset_root)
    size = loaded.input_size
    recipe = preprocess_from_config(loaded.config, size)  # the pixels the model was trained on
    train_imgs = split_tensors(ds, "train", recipe).images[:1024]
    calib = split_tensors(ds, "calibration", recipe)
    test = split_tensors(ds, "test", recipe)
    pca = fit_pca(loaded.model, train_imgs)
    metadata = build_metadata(loaded, band, pca_dims=int(pca[1].shape[0]))
    metadata["parity_sample"] = parity_sample_metadata(loaded.model, size)
    export_onnx_file(loaded.model, size, out, metadata, pca)
    images = parity_pool(calib.images, test.images, parity_images)
    parity = check_parity(loaded.model, out, images, loaded.classes, band)
    report_path = out.with_suffix(".parity.json")
    report_path.write_text(json.dumps(parity, indent=2))
    if not parity["passed"]:
        out.unlink(missing_ok=True)
        msg = (
            f"parity failed: max |Δp| = {parity['max_abs_prob_diff']:.2e} (limit {PARITY_ATOL}),"
            f" verdict agreement {parity['verdict_agreement']:.2%} (need 100%)"
        )
        raise ParityError(msg)
    result = ExportResult(out, sha256_file(out), {k: str(v) for k, v in metadata.items()}, parity)
    test_nhwc = test.images.permute(0, 2, 3, 1).contiguous().numpy()
    labels = test.labels.numpy()
    if fp16 or int8:
        from kensa.models.onnx.variants import make_fp16, make_int8

        base = run_onnx(cpu_session(out), test_nhwc)
        base_metrics = qc_metrics(base, labels, loaded.classes, band["t_ok"], band["t_defect"])
        if fp16:
            result.variants["fp16"] = make_fp16(
                out, test_nhwc, labels, loaded.classes, band, base, base_metrics, variant_tolerance
            )
        if int8:
            calib_nhwc = calib.images.permute(0, 2, 3, 1).contiguous().numpy()
            result.variants["int8"] = make_int8(
                out,
                calib_nhwc,
                test_nhwc,
                labels,
                loaded.classes,
                band,
                base,
                base_metrics,
                variant_tolerance,
            )
    (out.with_suffix(".export.json")).write_text(json.dumps(result.to_dict(), indent=2))
    return result


def build_metadata(loaded: LoadedModel, band: dict[str, Any], pca_dims: int) -> dict[str, Any]:
    """The self-description every kensa ONNX file carries (JSON-encoded string values)."""
    metadata: dict[str, Any] = {
        "kensa_format": "kensa-onnx/1",
        "model_name": loaded.model_name,
        "classes": loaded.classes,
        "input_size": loaded.input_size,
        "input_layout": "NHWC uint8 RGB",
        "thresholds": {k: band[k] for k in ("t_ok", "t_defect", "alpha", "delta", "guaranteed") if k in band},
        "band": band,
        "dataset_version": loaded.dataset_version,
        "training_config": loaded.config,
        "code_version": __version__,
        "feature_dims": pca_dims,
        # Serving decodes every request with this recipe: the one the training images went through.
        PREPROCESS_KEY: preprocess_from_config(loaded.config, loaded.input_size).to_dict(),
    }
    if loaded.backbone:
        # The pretrained weights the model started from (name, sha256, file) and the finetune
        # rung it trained (also in training_config); absent for a from-scratch model.
        metadata["backbone"] = {**loaded.backbone, "finetune": loaded.config.get("finetune")}
    return metadata
