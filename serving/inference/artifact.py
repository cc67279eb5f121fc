"""Read and verify a kensa ONNX file before it may judge a part: hash, checker, signature, parity.

The ONNX file describes itself (DESIGN.md, "The model artifact is self-describing"): classes,
input size, thresholds and a parity sample ride in its metadata. Serving reads them from the file,
never from training code, and refuses a file that does not keep its own promises.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from kensa.models.data.imageprep import Preprocess
from kensa.models.evaluation.qc import OK, verdicts
from kensa.models.onnx.contract import decode_metadata, parity_images, read_preprocess
from kensa.models.onnx.contract import sha256_file as file_sha256

CLASSIFIER = "classifier"
ANOMALY = "anomaly"
# What each kind of model outputs beyond the classifier's probs and features (DESIGN.md, "The
# model artifact is self-describing"): an anomaly model's image score and its map of where.
KINDS = (CLASSIFIER, ANOMALY)
ANOMALY_OUTPUTS = ("score", "anomaly_map")


class ModelRefused(Exception):
    """A model file failed a verification step; ``step`` names which one."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


@dataclass(frozen=True)
class ParitySample:
    """Noise images anyone can regenerate from (seed, n) and the probabilities they must give."""

    seed: int
    n: int
    probs: np.ndarray  # (n, C)
    atol: float


@dataclass(frozen=True)
class ModelSpec:
    """What a kensa ONNX file promises about itself."""

    classes: tuple[str, ...]
    input_size: int
    t_ok: float
    t_defect: float
    feature_dims: int
    architecture: str
    parity: ParitySample
    metadata: dict[str, Any]
    preprocess: Preprocess  # how requests are decoded: the recipe the model was trained with
    # classifier | anomaly; files from before anomaly models existed name no kind: classifiers.
    kind: str = CLASSIFIER

    @property
    def is_anomaly(self) -> bool:
        return self.kind == ANOMALY


def _number(thresholds: dict[str, Any], key: str) -> float:
    value = thresholds.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ModelRefused("metadata", f"thresholds.{key} must be a number; got {value!r}")
    return float(value)


def read_spec(proto: onnx.ModelProto) -> ModelSpec:
    """Parse and sanity-check the metadata; ModelRefused when a field is missing or malformed."""
    meta = decode_metadata(proto)
    classes = meta.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or classes[0] != OK:
        raise ModelRefused("metadata", f"classes must be a list starting with 'ok'; got {classes!r}")
    size = meta.get("input_size")
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 4096:
        raise ModelRefused("metadata", f"input_size must be an integer 8–4096; got {size!r}")
    thresholds = meta.get("thresholds")
    if not isinstance(thresholds, dict):
        raise ModelRefused("metadata", "thresholds (t_ok, t_defect) are missing")
    sample = meta.get("parity_sample")
    if not isinstance(sample, dict):
        raise ModelRefused("metadata", "parity_sample is missing; re-export the model")
    try:
        probs = np.asarray(sample["probs"], dtype=np.float64)
        parity = ParitySample(int(sample["seed"]), int(sample["n"]), probs, float(sample["atol"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelRefused("metadata", f"parity_sample is malformed ({exc})") from exc
    if probs.shape != (parity.n, len(classes)):
        raise ModelRefused(
            "metadata",
            f"parity_sample.probs has shape {probs.shape}, expected {(parity.n, len(classes))}",
        )
    try:
        preprocess = read_preprocess(meta)
    except ValueError as exc:
        raise ModelRefused("metadata", str(exc)) from exc
    kind = meta.get("kind", CLASSIFIER)
    if kind not in KINDS:
        raise ModelRefused("metadata", f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    return ModelSpec(
        classes=tuple(str(c) for c in classes),
        input_size=size,
        t_ok=_number(thresholds, "t_ok"),
        t_defect=_number(thresholds, "t_defect"),
        feature_dims=int(meta.get("feature_dims") or 0),
        architecture=str(meta.get("model_name", "unknown")),
        parity=parity,
        metadata=meta,
        preprocess=preprocess,
        kind=str(kind),
    )


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]


def check_signature(proto: onnx.ModelProto, spec: ModelSpec) -> None:
    """``images`` uint8 (N, S, S, 3) in; ``probs`` (N, C) and ``features`` (N, K) float out.

    An anomaly model also outputs ``score`` (N,) and ``anomaly_map`` (N, S, S), float. Only their
    ranks are checked here: the exporter's shape inference leaves the map's sides symbolic, so
    :func:`check_anomaly_outputs` checks the sizes on a real run.
    """
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    size = spec.input_size
    if len(inputs) != 1 or inputs[0].name != "images":
        raise ModelRefused("signature", f"expected one input 'images'; got {[i.name for i in inputs]}")
    images = inputs[0]
    if images.type.tensor_type.elem_type != onnx.TensorProto.UINT8:
        raise ModelRefused("signature", "input 'images' must be uint8")
    if _dims(images)[1:] != [size, size, 3] or len(_dims(images)) != 4:
        raise ModelRefused(
            "signature",
            f"input 'images' has shape {_dims(images)}, expected [N, {size}, {size}, 3]",
        )
    outputs = {o.name: o for o in proto.graph.output}
    for name, width in (("probs", len(spec.classes)), ("features", None)):
        out = outputs.get(name)
        if out is None:
            raise ModelRefused("signature", f"output '{name}' is missing; got {sorted(outputs)}")
        if out.type.tensor_type.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            raise ModelRefused("signature", f"output '{name}' must be float")
        dims = _dims(out)
        if len(dims) != 2 or (width is not None and dims[1] != width):
            expect = f"[N, {width}]" if width is not None else "[N, K]"
            raise ModelRefused("signature", f"output '{name}' has shape {dims}, expected {expect}")
    if not spec.is_anomaly:
        return
    for name, rank, expect in (("score", 1, "[N]"), ("anomaly_map", 3, f"[N, {size}, {size}]")):
        out = outputs.get(name)
        if out is None:
            raise ModelRefused("signature", f"an anomaly model needs output '{name}'; got {sorted(outputs)}")
        if out.type.tensor_type.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            raise ModelRefused("signature", f"output '{name}' must be float")
        if len(_dims(out)) != rank:
            raise ModelRefused("signature", f"output '{name}' has shape {_dims(out)}, expected {expect}")


def check_anomaly_outputs(spec: ModelSpec, scores: np.ndarray, maps: np.ndarray, probs: np.ndarray) -> None:
    """An anomaly model's outputs on the parity sample: a map per image at the input size, values
    in [0, 1], and a score that is the ``probs`` column serving's verdicts read (p(defect))."""
    n, size = spec.parity.n, spec.input_size
    if maps.shape != (n, size, size) or scores.shape != (n,):
        raise ModelRefused(
            "parity",
            f"the model gave score {scores.shape} and anomaly_map {maps.shape}; "
            f"expected {(n,)} and {(n, size, size)}",
        )
    if not (np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0):
        raise ModelRefused("parity", "anomaly_map values must be finite and within [0, 1]")
    if float(np.abs(scores - probs[:, 1]).max()) > spec.parity.atol:
        raise ModelRefused("parity", "score differs from probs[:, 1], the defect probability verdicts use")


def load_and_check(path: Path, expected_sha256: str | None) -> tuple[str, ModelSpec]:
    """Steps that need no session: SHA-256 against the registration record, checker, signature.

    Returns the file's hash and its spec; raises ModelRefused naming the failed step.
    """
    sha = file_sha256(path)
    if expected_sha256 is not None and sha != expected_sha256.lower():
        raise ModelRefused(
            "sha256",
            f"file hash {sha[:12]}… does not match the {expected_sha256[:12]}… recorded at registration",
        )
    try:
        onnx.checker.check_model(str(path))
        proto = onnx.load(str(path), load_external_data=False)
    except (
        onnx.checker.ValidationError,
        onnx.onnx_cpp2py_export.shape_inference.InferenceError,
    ) as exc:
        raise ModelRefused("checker", f"ONNX checker rejected the file: {exc}") from exc
    except Exception as exc:  # a truncated or foreign file fails protobuf parsing
        raise ModelRefused("checker", f"not a readable ONNX file: {type(exc).__name__}") from exc
    spec = read_spec(proto)
    check_signature(proto, spec)
    return sha, spec


def check_parity(
    spec: ModelSpec, run: Callable[[np.ndarray], np.ndarray], atol: float | None = None
) -> float:
    """Run the parity sample through ``run`` (images → probs); the max |Δp|, or ModelRefused."""
    images = parity_images(spec.parity.seed, spec.parity.n, spec.input_size)
    got = np.asarray(run(images), dtype=np.float64)
    want = spec.parity.probs
    if got.shape != want.shape:
        raise ModelRefused("parity", f"the model gave probs of shape {got.shape}, expected {want.shape}")
    diff = float(np.abs(got - want).max())
    limit = spec.parity.atol if atol is None else atol
    v_got, _ = verdicts(got, spec.classes, spec.t_ok, spec.t_defect)
    v_want, _ = verdicts(want, spec.classes, spec.t_ok, spec.t_defect)
    if diff > limit or not bool((v_got == v_want).all()):
        raise ModelRefused(
            "parity",
            f"the parity sample gives max |Δp| = {diff:.2e} (limit {limit:.1e}) "
            f"and {int((v_got != v_want).sum())} changed verdicts",
        )
    return diff
