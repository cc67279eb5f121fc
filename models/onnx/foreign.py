"""What a foreign ONNX graph takes and gives, checked against a dataset before kensa wraps it.

A data scientist's ONNX file (``torch.onnx.export`` of a torchvision model, a file from another
tool) rarely speaks kensa's contract (uint8 NHWC ``images`` in, ``probs`` and ``features`` out).
This module reads its one image input and its class-score output and says, in words, what does not
fit; ``models/onnx/adapt.py`` then wraps what does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort

Layout = Literal["NCHW", "NHWC"]
OutputKind = Literal["logits", "probs"]

# ONNX element types kensa can feed an image as; float inputs get normalisation in the wrapper.
INPUT_TYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.UINT8: "uint8",
}
FLOAT_OUTPUTS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


class IncompatibleModelError(ValueError):
    """A model that cannot be fitted to the dataset or kensa's contract; says what does not fit."""


@dataclass(frozen=True)
class OnnxSignature:
    """The parts of a foreign graph the wrapper needs: its image input and its class scores."""

    input_name: str
    input_dtype: str  # float32 | float16 | uint8
    layout: Layout
    size: int | None  # the fixed square side the graph demands, None when it takes any
    fixed_batch: int | None  # a batch size baked into the graph (torch.onnx.export's default: 1)
    output_name: str
    output_kind: OutputKind  # logits (or log-probabilities) get a softmax; probs pass through
    num_classes: int
    opset: int

    def describe(self) -> str:
        side = f"{self.size}×{self.size}" if self.size else "H×W"
        shape = f"3×{side}" if self.layout == "NCHW" else f"{side}×3"
        batch = str(self.fixed_batch) if self.fixed_batch else "N"
        return (
            f"{self.input_dtype} {self.layout} input '{self.input_name}' [{batch}×{shape}] → "
            f"{self.output_kind} '{self.output_name}' [{batch}×{self.num_classes}]"
        )


def dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    """Shape of a graph input/output: ints where fixed, the symbol (or '?') where not."""
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]


def default_opset(proto: onnx.ModelProto) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    msg = "the graph imports no standard ONNX opset"
    raise IncompatibleModelError(msg)


def graph_inputs(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Inputs a caller feeds (old exporters also list initializers as inputs)."""
    initializers = {t.name for t in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in initializers]


def load_onnx(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        msg = f"{path} does not exist"
        raise IncompatibleModelError(msg)
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as exc:  # noqa: BLE001 - protobuf and checker raise many types for a bad file
        msg = f"{path.name} is not a valid ONNX model ({type(exc).__name__}: {str(exc)[:200]})"
        raise IncompatibleModelError(msg) from None
    return proto


def _input_side(shape: list[int | str], layout: Layout, name: str) -> int | None:
    h, w = (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])
    if isinstance(h, int) and isinstance(w, int):
        if h != w:
            msg = f"input '{name}' takes {h}×{w} images; kensa serves square images (S×S)"
            raise IncompatibleModelError(msg)
        return h
    return None


def _read_input(proto: onnx.ModelProto) -> tuple[str, str, Layout, int | None, int | None]:
    inputs = graph_inputs(proto)
    if len(inputs) != 1:
        names = ", ".join(f"'{i.name}'" for i in inputs) or "none"
        msg = f"the graph has {len(inputs)} inputs ({names}); kensa feeds exactly one image tensor"
        raise IncompatibleModelError(msg)
    inp = inputs[0]
    elem = inp.type.tensor_type.elem_type
    if elem not in INPUT_TYPES:
        name = onnx.TensorProto.DataType.Name(elem)
        msg = f"input '{inp.name}' is {name}; kensa feeds float32, float16 or uint8 images"
        raise IncompatibleModelError(msg)
    shape = dims(inp)
    if len(shape) != 4:
        msg = f"input '{inp.name}' has shape {shape}; kensa feeds images as [N, 3, H, W] or [N, H, W, 3]"
        raise IncompatibleModelError(msg)
    layout: Layout
    if shape[1] == 3:
        layout = "NCHW"
    elif shape[3] == 3:
        layout = "NHWC"
    else:
        msg = (
            f"input '{inp.name}' has shape {shape}: no axis of 3 colour channels; kensa feeds RGB "
            "images as [N, 3, H, W] (NCHW) or [N, H, W, 3] (NHWC)"
        )
        raise IncompatibleModelError(msg)
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    return inp.name, INPUT_TYPES[elem], layout, _input_side(shape, layout, inp.name), batch


def session(proto: onnx.ModelProto, quiet: bool = False) -> ort.InferenceSession:
    """A CPU session on an in-memory graph; ``quiet`` also hides errors (kensa reports them)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 4 if quiet else 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def inspect_onnx(proto: onnx.ModelProto, classes: Sequence[str], dataset_size: int) -> OnnxSignature:
    """Check a foreign graph against the dataset's classes; IncompatibleModelError names the misfit.

    One dummy inference finds the real output shapes (exporters often leave them symbolic).
    """
    opset = default_opset(proto)
    name, dtype, layout, size, batch = _read_input(proto)
    side = size or dataset_size
    shape = (batch or 1, 3, side, side) if layout == "NCHW" else (batch or 1, side, side, 3)
    try:
        sess = session(proto, quiet=True)
        dummy = np.zeros(shape, dtype=np.dtype(dtype))
        results = sess.run(None, {name: dummy})
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        msg = f"onnxruntime cannot run the graph on a {list(shape)} {dtype} image batch ({str(exc)[:300]})"
        raise IncompatibleModelError(msg) from None
    outputs = [o.name for o in sess.get_outputs()]
    producers = {out: node.op_type for node in proto.graph.node for out in node.output}
    found = []
    for out_name, value in zip(outputs, results, strict=True):
        arr = np.asarray(value)
        found.append(f"'{out_name}' {list(arr.shape)} {arr.dtype}")
        if arr.ndim == 2 and arr.shape[1] == len(classes) and np.issubdtype(arr.dtype, np.floating):
            kind: OutputKind = "probs" if producers.get(out_name) == "Softmax" else "logits"
            return OnnxSignature(name, dtype, layout, size, batch, out_name, kind, len(classes), opset)
    msg = (
        f"no output gives one score per class: the graph's outputs are {', '.join(found)}; the "
        f"dataset has {len(classes)} classes ({', '.join(classes)}), so kensa needs a float "
        f"output [N, {len(classes)}] of class logits or probabilities in that order"
    )
    raise IncompatibleModelError(msg)
