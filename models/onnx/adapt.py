"""Wrap a foreign ONNX graph to kensa's contract: uint8 NHWC ``images`` → ``probs``, ``features``.

The normalisation the source model expects (scale to [0, 1], ImageNet mean/std, NCHW) moves
inside the graph, a softmax is appended to logits, and a PCA of the class scores becomes the drift
``features`` output (black-box shift detection: a classifier's outputs are a compact, sensitive
summary of its input distribution). A batch size baked into the graph (``torch.onnx.export``
without ``dynamic_axes``) is lifted, or the graph runs once per image inside a ``Scan``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from kensa.models.onnx.foreign import IncompatibleModelError, OnnxSignature, session

RESERVED = ("images", "probs", "features")
SRC_INPUT = "kensa_src_input"
SRC_OUTPUT = "kensa_src_out"
_NP_TYPES = {"float32": np.float32, "float16": np.float16, "uint8": np.uint8}
_ONNX_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "uint8": TensorProto.UINT8}


def check_normalisation(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    m, s = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if m.shape != (3,) or s.shape != (3,) or not (s > 0).all():
        msg = f"mean and std need 3 values each (R, G, B), std > 0; got mean={list(mean)}, std={list(std)}"
        raise IncompatibleModelError(msg)
    return m, s


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for coll in (graph.input, graph.output, graph.value_info):
        for v in coll:
            if v.name == old:
                v.name = new
    for t in graph.initializer:
        if t.name == old:
            t.name = new


def _prepared(proto: onnx.ModelProto, sig: OnnxSignature) -> onnx.ModelProto:
    """A copy whose input/output are renamed out of the way of kensa's own tensor names."""
    src = onnx.ModelProto()
    src.CopyFrom(proto)
    g = src.graph
    _rename(g, sig.input_name, SRC_INPUT)
    _rename(g, sig.output_name, SRC_OUTPUT)
    taken = {n for node in g.node for n in node.output} | {t.name for t in g.initializer}
    for name in RESERVED:
        if name in taken:
            _rename(g, name, f"kensa_src_{name}")
    del g.value_info[:]  # shapes inferred for the old batch size would only mislead
    return src


def _with_symbolic_batch(src: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(src)
    for inp in out.graph.input:
        if inp.name == SRC_INPUT:
            inp.type.tensor_type.shape.dim[0].Clear()
            inp.type.tensor_type.shape.dim[0].dim_param = "batch"
    for o in out.graph.output:
        o.type.tensor_type.ClearField("shape")
    return out


class OnnxReference(nn.Module):
    """The unmodified source graph behind PyTorch's interface: float [0,1] (B,3,S,S) → logits.

    It is what parity compares the wrapped graph with, and what fits the drift PCA. A graph that
    outputs probabilities answers with their logarithm, so a softmax gives them back exactly.
    """

    def __init__(
        self,
        proto: onnx.ModelProto,
        sig: OnnxSignature,
        mean: Sequence[float],
        std: Sequence[float],
        quiet: bool = False,
    ) -> None:
        super().__init__()
        self.sig = sig
        self.mean, self.std = check_normalisation(mean, std)
        self.sess = session(proto, quiet)

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Raw class scores (N, C) float32 of the source graph for float [0,1] NCHW images."""
        sig = self.sig
        if sig.layout == "NHWC":
            x = x.transpose(0, 2, 3, 1)
        shape = (1, 3, 1, 1) if sig.layout == "NCHW" else (1, 1, 1, 3)
        if sig.input_dtype == "uint8":
            feed = np.rint(x * 255.0).clip(0, 255).astype(np.uint8)
        else:
            norm = (x - self.mean.reshape(shape)) / self.std.reshape(shape)
            feed = norm.astype(_NP_TYPES[sig.input_dtype])
        step = sig.fixed_batch or 64
        outs = [
            self.sess.run([sig.output_name], {sig.input_name: feed[i : i + step]})[0]
            for i in range(0, len(feed), step)
        ]
        return np.concatenate(outs).astype(np.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.from_numpy(self.scores(x.detach().cpu().float().numpy()))
        return torch.log(z.clamp_min(1e-12)) if self.sig.output_kind == "probs" else z


def lift_fixed_batch(
    proto: onnx.ModelProto, sig: OnnxSignature, ref: OnnxReference, size: int
) -> tuple[onnx.ModelProto, bool]:
    """(prepared source, batched?): the batch made symbolic when the graph still gives each image
    what it gives alone; otherwise the fixed-batch source, to run per image in a ``Scan``."""
    src = _prepared(proto, sig)
    if sig.fixed_batch is None:
        return src, True
    lifted = _with_symbolic_batch(src)
    x = np.random.default_rng(0).random((3, 3, size, size), dtype=np.float32)
    try:
        batched_sig = replace(sig, input_name=SRC_INPUT, output_name=SRC_OUTPUT, fixed_batch=None)
        got = OnnxReference(lifted, batched_sig, ref.mean.tolist(), ref.std.tolist(), quiet=True).scores(x)
        if np.allclose(got, ref.scores(x), rtol=1e-3, atol=1e-4):
            return lifted, True
    except Exception:  # noqa: BLE001, S110 - a graph that breaks with batch 3 takes the Scan path
        pass
    if sig.fixed_batch != 1:
        msg = (
            f"the graph has batch size {sig.fixed_batch} baked into its shapes; export it with a "
            "dynamic batch axis (torch.onnx.export(..., dynamic_axes={'input': {0: 'batch'}})) or batch 1"
        )
        raise IncompatibleModelError(msg)
    return src, False


def _const(name: str, arr: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(arr, name)


def _squeeze_like(op: str, data: str, out: str, opset: int, inits: list[TensorProto]) -> onnx.NodeProto:
    if opset >= 13:
        if not any(t.name == "kensa_axes0" for t in inits):
            inits.append(_const("kensa_axes0", np.array([0], np.int64)))
        return helper.make_node(op, [data, "kensa_axes0"], [out])
    return helper.make_node(op, [data], [out], axes=[0])


def _preprocess(sig: OnnxSignature, mean: np.ndarray, std: np.ndarray, out: str) -> tuple[list, list]:
    """Nodes from uint8 NHWC ``images`` to the source's input dtype and layout, normalised."""
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    cur = "images"
    if sig.layout == "NCHW":
        nodes.append(helper.make_node("Transpose", [cur], ["kensa_nchw"], perm=[0, 3, 1, 2]))
        cur = "kensa_nchw"
    if sig.input_dtype == "uint8":
        nodes.append(helper.make_node("Identity", [cur], [out]))
        return nodes, inits
    shape = (1, 3, 1, 1) if sig.layout == "NCHW" else (1, 1, 1, 3)
    # (x/255 − mean)/std as one multiply-add: x·(1/(255·std)) − mean/std.
    inits += [
        _const("kensa_scale", (1.0 / (255.0 * std)).reshape(shape).astype(np.float32)),
        _const("kensa_shift", (mean / std).reshape(shape).astype(np.float32)),
    ]
    nodes += [
        helper.make_node("Cast", [cur], ["kensa_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["kensa_float", "kensa_scale"], ["kensa_scaled"]),
        helper.make_node("Sub", ["kensa_scaled", "kensa_shift"], ["kensa_norm"]),
    ]
    nodes.append(helper.make_node("Cast", ["kensa_norm"], [out], to=_ONNX_TYPES[sig.input_dtype]))
    return nodes, inits


def _scan_node(src: onnx.ModelProto, sig: OnnxSignature, pre: str, out: str, size: int) -> onnx.NodeProto:
    """Run the fixed-batch-1 source once per image: Scan over the batch axis."""
    g = src.graph
    body_inits = list(g.initializer)
    per_image = [3, size, size] if sig.layout == "NCHW" else [size, size, 3]
    body_nodes = [_squeeze_like("Unsqueeze", "kensa_scan_in", SRC_INPUT, sig.opset, body_inits)]
    body_nodes += list(g.node)
    body_nodes.append(_squeeze_like("Squeeze", SRC_OUTPUT, "kensa_scan_out", sig.opset, body_inits))
    out_type = next(o.type.tensor_type.elem_type for o in g.output if o.name == SRC_OUTPUT)
    body = helper.make_graph(
        body_nodes,
        "kensa_per_image",
        [helper.make_tensor_value_info("kensa_scan_in", _ONNX_TYPES[sig.input_dtype], per_image)],
        [helper.make_tensor_value_info("kensa_scan_out", out_type, [sig.num_classes])],
        initializer=body_inits,
    )
    return helper.make_node("Scan", [pre], [out], body=body, num_scan_inputs=1)


def wrap_graph(
    src: onnx.ModelProto,
    batched: bool,
    sig: OnnxSignature,
    ref: OnnxReference,
    size: int,
    pca: tuple[np.ndarray, np.ndarray],
) -> onnx.ModelProto:
    """The kensa graph around the prepared source (``lift_fixed_batch``); metadata comes later.

    ``pca`` is (mean (C,), components (K, C)) of the source's class scores on training images.
    """
    if not batched and sig.opset < 9:
        msg = (
            f"the graph has a fixed batch size and opset {sig.opset}; "
            "kensa needs opset ≥ 9 to run it once per image"
        )
        raise IncompatibleModelError(msg)
    nodes, inits = _preprocess(sig, ref.mean, ref.std, "kensa_pre" if not batched else SRC_INPUT)
    if batched:
        nodes += list(src.graph.node)
        inits += list(src.graph.initializer)
    else:
        nodes.append(_scan_node(src, sig, "kensa_pre", SRC_OUTPUT, size))
    pca_mean, components = pca
    inits += [
        _const("kensa_pca_mean", pca_mean.astype(np.float32)),
        _const("kensa_pca_components", np.ascontiguousarray(components.T).astype(np.float32)),
    ]
    nodes.append(helper.make_node("Cast", [SRC_OUTPUT], ["kensa_scores"], to=TensorProto.FLOAT))
    if sig.output_kind == "logits":
        nodes.append(helper.make_node("Softmax", ["kensa_scores"], ["probs"], axis=1))
    else:
        nodes.append(helper.make_node("Identity", ["kensa_scores"], ["probs"]))
    nodes += [
        helper.make_node("Sub", ["kensa_scores", "kensa_pca_mean"], ["kensa_centred"]),
        helper.make_node("MatMul", ["kensa_centred", "kensa_pca_components"], ["features"]),
    ]
    graph = helper.make_graph(
        nodes,
        "kensa_wrapped",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", size, size, 3])],
        [
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", sig.num_classes]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", int(components.shape[0])]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=list(src.opset_import), producer_name="kensa")
    model.ir_version = src.ir_version
    model.functions.extend(src.functions)  # local functions of dynamo exports stay callable
    onnx.checker.check_model(model)
    return model


def fit_score_pca(scores: np.ndarray, k: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """PCA of class scores (N, C): mean (C,) and the top-k components (k, C)."""
    z = scores.astype(np.float64)
    mean = z.mean(0)
    k = max(1, min(k, z.shape[1], len(z) - 1))
    _, _, vh = np.linalg.svd(z - mean, full_matrices=False)
    return mean.astype(np.float32), vh[:k].astype(np.float32)
