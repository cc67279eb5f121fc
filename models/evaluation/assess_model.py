"""Any model through kensa's bar: the QC evaluation, band, corruption suite and ONNX parity of a run.

A data scientist's own ``nn.Module`` and a foreign ONNX file get exactly what a flow-trained model
gets (``evaluate_predictor``, ``export_loaded``); only the way their predictions are produced
differs. Nothing here touches MLflow or the registry: ``kensa/notebook/experiments.py`` records and gates.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from kensa import __version__
from kensa.models.data.ingest import DatasetVersion
from kensa.models.data.parts import load_image
from kensa.models.evaluation.evaluate_run import BandPolicy, evaluate_predictor
from kensa.models.nets.zoo import IMAGENET_MEAN, IMAGENET_STD, count_parameters
from kensa.models.onnx.adapt import OnnxReference, fit_score_pca, lift_fixed_batch, wrap_graph
from kensa.models.onnx.contract import sha256_file
from kensa.models.onnx.export import (
    _EXPORT_LOCK,
    OPSET,
    ParityError,
    build_metadata,
    check_parity,
    export_loaded,
    parity_pool,
    parity_sample_metadata,
    run_onnx,
)
from kensa.models.onnx.foreign import IncompatibleModelError, inspect_onnx, load_onnx, session
from kensa.models.train.trainer import LoadedModel, dataset_image_size, predict_probs, split_tensors

ONNX_NAME = "model.onnx"


@dataclass
class Assessment:
    """What the evaluation and export of one model found, before any gate is applied."""

    name: str
    kind: str  # "module" | "onnx"
    run_dir: Path
    input_size: int
    parameters: int
    metrics: dict[str, Any]
    parity: dict[str, Any]
    onnx_path: Path | None  # None when export or parity failed (no file is kept)
    export_error: str | None  # why there is no file, in words
    signature: str  # what the model takes and gives


@dataclass(frozen=True)
class EvalOptions:
    """The same knobs the flows set from the project config."""

    policy: BandPolicy
    reference_report: dict[str, Any] | None = None
    max_robustness_images: int = 192
    show_progress: bool = True


def check_module_output(model: nn.Module, images: torch.Tensor, classes: Sequence[str]) -> None:
    """IncompatibleModelError unless ``model`` maps float [0,1] (B,3,S,S) images to (B, C) logits."""
    x = images[:2].float() / 255.0
    shape = f"[{len(x)}, 3, {x.shape[2]}, {x.shape[3]}]"
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # noqa: BLE001 - any failure means the module does not take these images
        msg = f"the model fails on a batch of images {shape} float in [0, 1]: {type(exc).__name__}: {exc}"
        raise IncompatibleModelError(msg) from None
    if not isinstance(out, torch.Tensor) or out.shape != (len(x), len(classes)):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        msg = (
            f"the model returns {got} for images {shape}; the dataset has {len(classes)} classes "
            f"({', '.join(classes)}), so it must return logits [N, {len(classes)}] in that order"
        )
        raise IncompatibleModelError(msg)


def _evaluate(
    predict: Callable[[torch.Tensor], np.ndarray],
    ds: DatasetVersion,
    run_dir: Path,
    name: str,
    size: int,
    options: EvalOptions,
) -> dict[str, Any]:
    """The one QC evaluation every model goes through: band, test metrics, corruption suite."""
    return evaluate_predictor(
        predict,
        ds,
        run_dir,
        input_size=size,
        model_name=name,
        trained_on_dataset_version=ds.version,
        corruptions=True,
        policy=options.policy,
        reference_report=options.reference_report,
        max_robustness_images=options.max_robustness_images,
        show_progress=options.show_progress,
    )


def assess_module(
    model: nn.Module,
    ds: DatasetVersion,
    run_dir: Path,
    *,
    name: str,
    options: EvalOptions,
    input_size: int | None = None,
    config: dict[str, Any] | None = None,
) -> Assessment:
    """Evaluate and export a PyTorch module on the CPU (put in eval mode: pass a copy to keep
    training yours)."""
    size = input_size or dataset_image_size(ds)
    net = model.cpu().eval()
    first = [r.absolute_path for r in ds.split("calibration")[:2]]
    check_module_output(net, torch.stack([load_image(p, size) for p in first]), ds.classes)
    if isinstance(net, torch.jit.ScriptModule):
        return _assess_torchscript(net, ds, run_dir, name=name, options=options, size=size, config=config)
    metrics = _evaluate(lambda images: predict_probs(net, images), ds, run_dir, name, size, options)
    loaded = LoadedModel(net, name, list(ds.classes), size, config or {}, ds.version, ds.root, {})
    out = run_dir / ONNX_NAME
    path: Path | None = out
    error = None
    try:
        parity = export_loaded(loaded, metrics["band"], out).parity
    except ParityError as exc:
        parity, path, error = _read_parity(out), None, str(exc)
    except Exception as exc:  # noqa: BLE001 - the exporter's failures are the model's, reported as a gate
        parity, path = {"passed": False}, None
        error = f"ONNX export failed: {type(exc).__name__}: {str(exc)[:300]}"
    signature = f"float32 NCHW [N×3×{size}×{size}] in [0, 1] → logits [N×{len(ds.classes)}]"
    return Assessment(
        name, "module", run_dir, size, count_parameters(net), metrics, parity, path, error, signature
    )


def _assess_torchscript(
    net: torch.jit.ScriptModule,
    ds: DatasetVersion,
    run_dir: Path,
    *,
    name: str,
    options: EvalOptions,
    size: int,
    config: dict[str, Any] | None,
) -> Assessment:
    """TorchScript cannot be traced inside kensa's export graph: export it on its own (float
    [0, 1] NCHW → logits) and wrap that graph like a foreign file, with parity against the
    TorchScript module itself."""
    run_dir.mkdir(parents=True, exist_ok=True)
    source = run_dir / "torchscript_source.onnx"
    with _EXPORT_LOCK:  # the TorchScript exporter keeps global state: one export at a time
        torch.onnx.export(
            net,
            (torch.rand(2, 3, size, size),),
            str(source),
            # Only the TorchScript exporter takes a ScriptModule: torch.export (the dynamo=True
            # default since torch 2.9) refuses one ("Exporting a ScriptModule is not supported"),
            # and it would also need onnxscript, which kensa does not install.
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    a = assess_onnx(
        source,
        ds,
        run_dir,
        name=name,
        options=options,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        config=config,
        parity_reference=net,
    )
    a.parameters = count_parameters(net)
    a.signature = f"TorchScript, float32 NCHW [N×3×{size}×{size}] in [0, 1] → logits [N×{len(ds.classes)}]"
    return a


def _read_parity(onnx_out: Path) -> dict[str, Any]:
    report = onnx_out.with_suffix(".parity.json")
    return dict(json.loads(report.read_text())) if report.is_file() else {"passed": False}


def save_onnx(proto: onnx.ModelProto, metadata: dict[str, Any], out: Path) -> None:
    """Write ``proto`` to ``out`` with ``metadata`` as its properties (JSON for non-strings), atomically."""
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    proto.producer_version = __version__
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=out.parent)
    os.close(fd)
    try:
        onnx.save(proto, tmp)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)


def assess_onnx(
    path: Path,
    ds: DatasetVersion,
    run_dir: Path,
    *,
    name: str,
    options: EvalOptions,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    config: dict[str, Any] | None = None,
    parity_reference: nn.Module | None = None,
) -> Assessment:
    """Wrap a foreign ONNX graph to the contract, evaluate the wrapped graph, check it against
    the source graph. IncompatibleModelError (before any work) when it cannot fit the dataset.

    ``mean``/``std`` (on the [0, 1] scale) are the normalisation a float-input graph expects.
    ``parity_reference`` replaces the source graph as what parity compares with (a PyTorch model
    the graph was exported from).
    """
    proto = load_onnx(path)
    sig = inspect_onnx(proto, ds.classes, dataset_image_size(ds))
    size = sig.size or dataset_image_size(ds)
    ref = OnnxReference(proto, sig, mean, std)
    src, batched = lift_fixed_batch(proto, sig, ref, size)
    train_images = split_tensors(ds, "train", size).images[:1024]
    pca = fit_score_pca(ref.scores(train_images.float().numpy() / 255.0))
    wrapped = wrap_graph(src, batched, sig, ref, size, pca)
    sess = session(wrapped)

    def predict(images: torch.Tensor) -> np.ndarray:
        return run_onnx(sess, images.permute(0, 2, 3, 1).contiguous().numpy())

    # The wrapped graph is what serving will run, so it is what the band is calibrated on.
    metrics = _evaluate(predict, ds, run_dir, name, size, options)
    band = metrics["band"]
    source = {
        "source": "onnx",
        "file": path.name,
        "sha256": sha256_file(path),
        "signature": sig.describe(),
        "batched": batched,
        "mean": list(map(float, mean)),
        "std": list(map(float, std)),
    }
    config = {**source, **(config or {})}
    loaded = LoadedModel(ref, name, list(ds.classes), size, config, ds.version, ds.root, {})
    metadata = build_metadata(loaded, band, pca_dims=int(pca[1].shape[0]))
    truth = parity_reference if parity_reference is not None else ref
    metadata["parity_sample"] = parity_sample_metadata(truth, size)
    out = run_dir / ONNX_NAME
    save_onnx(wrapped, metadata, out)
    calib, test = split_tensors(ds, "calibration", size), split_tensors(ds, "test", size)
    parity = check_parity(truth, out, parity_pool(calib.images, test.images, 256), list(ds.classes), band)
    out.with_suffix(".parity.json").write_text(json.dumps(parity, indent=2))
    path_kept: Path | None = out
    error = None
    if not parity["passed"]:
        out.unlink()
        path_kept = None
        error = (
            f"parity failed: the wrapped graph differs from the source by max |Δp| = "
            f"{parity['max_abs_prob_diff']:.2e}, verdict agreement {parity['verdict_agreement']:.2%}"
        )
    parameters = int(sum(int(np.prod(t.dims)) for t in proto.graph.initializer))
    return Assessment(
        name,
        "onnx" if parity_reference is None else "torchscript",
        run_dir,
        size,
        parameters,
        metrics,
        parity,
        path_kept,
        error,
        sig.describe(),
    )


def load_model_file(
    path: Path, num_classes: int, input_size: int, arch: str | None = None
) -> tuple[nn.Module, str]:
    """A TorchScript file, a kensa checkpoint, or a state dict with its zoo ``arch``, as a module.

    Returns (module, what the file was); IncompatibleModelError says what is missing.
    """
    from kensa.models.nets.zoo import UnknownModelError, build_model, load_local_weights, model_names

    if not path.is_file():
        msg = f"{path} does not exist"
        raise IncompatibleModelError(msg)
    try:
        return torch.jit.load(str(path), map_location="cpu"), "TorchScript"
    except (RuntimeError, ValueError):
        pass  # not TorchScript: try a checkpoint or a state dict
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle and zip readers raise many types
        msg = (
            f"{path.name} is not ONNX, TorchScript or a PyTorch state dict ({type(exc).__name__}); "
            "accepted: .onnx, a TorchScript file (torch.jit.save), a state dict with --arch"
        )
        raise IncompatibleModelError(msg) from None
    is_checkpoint = isinstance(payload, dict) and str(payload.get("format", "")).startswith(
        "kensa-checkpoint"
    )
    kind = "kensa checkpoint" if is_checkpoint else "state dict"
    if is_checkpoint:
        arch = str(payload["model_name"])
    if not isinstance(payload, dict) or not payload:
        msg = f"{path.name} holds a {type(payload).__name__}, not a state dict of tensors"
        raise IncompatibleModelError(msg)
    if arch is None:
        msg = (
            f"{path.name} is a state dict, not a model: name its architecture with --arch "
            f"(one of {', '.join(model_names())})"
        )
        raise IncompatibleModelError(msg)
    try:
        model = build_model(arch, num_classes, input_size=input_size)
        # QCNet's own normalisation constants are not in a torchvision state dict; all else must be.
        skipped = [k for k in load_local_weights(model, path) if k not in ("mean", "std")]
    except (UnknownModelError, ValueError) as exc:
        raise IncompatibleModelError(str(exc)) from None
    if skipped:
        shown = ", ".join(skipped[:4]) + (f" and {len(skipped) - 4} more" if len(skipped) > 4 else "")
        msg = (
            f"{path.name} does not fit {arch} with {num_classes} classes: no matching tensor for "
            f"{shown} (a different architecture, or a head for another number of classes?)"
        )
        raise IncompatibleModelError(msg)
    return model.eval(), f"{kind} ({arch})"
