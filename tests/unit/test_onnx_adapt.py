"""Foreign ONNX graphs wrapped to kensa's contract, or refused with a message naming the misfit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from kensa.models.onnx.adapt import OnnxReference, fit_score_pca, lift_fixed_batch, wrap_graph
from kensa.models.onnx.export import check_parity
from kensa.models.onnx.foreign import IncompatibleModelError, inspect_onnx, load_onnx, session

CLASSES = ["ok", "defect_a", "defect_b"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = 16


class Conv(nn.Module):
    """A few convolutions ending in class logits; options mimic what other tools export."""

    def __init__(self, classes: int = 3, nhwc: bool = False, softmax: bool = False, fixed: bool = False):
        super().__init__()
        self.nhwc, self.softmax, self.fixed = nhwc, softmax, fixed
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * (SIZE // 2) ** 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nhwc:
            x = x.permute(0, 3, 1, 2)
        h = torch.relu(self.conv(x.float()))
        # A flatten that bakes batch size 1 into the graph, as some exporters do.
        h = h.reshape(1, -1) if self.fixed else h.flatten(1)
        z = self.fc(h)
        return torch.softmax(z, 1) if self.softmax else z


def export(model: nn.Module, path: Path, example: torch.Tensor) -> onnx.ModelProto:
    torch.manual_seed(0)
    torch.onnx.export(
        model.eval(), (example,), str(path), dynamo=False, input_names=["x"], output_names=["y"]
    )
    return load_onnx(path)


def wrapped(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, OnnxReference, bool]:
    sig = inspect_onnx(proto, CLASSES, SIZE)
    ref = OnnxReference(proto, sig, MEAN, STD)
    src, batched = lift_fixed_batch(proto, sig, ref, SIZE)
    images = np.random.default_rng(0).random((8, 3, SIZE, SIZE), dtype=np.float32)
    return wrap_graph(src, batched, sig, ref, SIZE, fit_score_pca(ref.scores(images))), ref, batched


def uint8_images(n: int = 5) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("model", "example", "expect_batched"),
    [
        (Conv(), torch.rand(1, 3, SIZE, SIZE), True),  # float NCHW logits, batch 1 liftable
        (Conv(softmax=True, fixed=True), torch.rand(1, 3, SIZE, SIZE), False),  # runs per image
        (Conv(nhwc=True), torch.randint(0, 255, (1, SIZE, SIZE, 3), dtype=torch.uint8), True),
    ],
    ids=["float-nchw-logits", "fixed-batch-probs", "uint8-nhwc"],
)
def test_wrapped_graph_speaks_the_contract_and_matches_the_source(
    tmp_path: Path, model: nn.Module, example: torch.Tensor, expect_batched: bool
) -> None:
    proto = export(model, tmp_path / "m.onnx", example)
    graph, ref, batched = wrapped(proto)
    assert batched is expect_batched
    assert [i.name for i in graph.graph.input] == ["images"]
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    images = uint8_images()
    probs, features = session(graph).run(["probs", "features"], {"images": images})
    assert probs.shape == (5, 3) and features.shape[0] == 5
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    # What the source model gives for the same parts, fed the way it expects (normalised float or
    # uint8, its own layout): the wrapper must reproduce it image by image.
    expected = torch.softmax(ref(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255), 1)
    np.testing.assert_allclose(probs, expected.numpy(), atol=1e-5)


def test_parity_catches_a_wrapper_with_the_wrong_normalisation(tmp_path: Path) -> None:
    proto = export(Conv(), tmp_path / "m.onnx", torch.rand(1, 3, SIZE, SIZE))
    graph, _, _ = wrapped(proto)
    onnx.save(graph, str(tmp_path / "w.onnx"))
    sig = inspect_onnx(proto, CLASSES, SIZE)
    images = torch.from_numpy(uint8_images(32)).permute(0, 3, 1, 2).contiguous()
    band = {"t_ok": 0.3, "t_defect": 0.7}
    right = check_parity(OnnxReference(proto, sig, MEAN, STD), tmp_path / "w.onnx", images, CLASSES, band)
    wrong = check_parity(
        OnnxReference(proto, sig, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
        tmp_path / "w.onnx",
        images,
        CLASSES,
        band,
    )
    assert right["passed"] and right["max_abs_prob_diff"] < 1e-5
    assert not wrong["passed"]


@pytest.mark.parametrize(
    ("model", "example", "needle"),
    [
        (Conv(classes=5), torch.rand(1, 3, SIZE, SIZE), "'y' [1, 5] float32; the dataset has 3 classes"),
        (nn.Conv2d(3, 3, 3), torch.rand(1, 3, SIZE, SIZE), "no output gives one score per class"),
        (nn.Conv2d(1, 3, 3), torch.rand(1, 1, SIZE, SIZE), "no axis of 3 colour channels"),
        (nn.Conv2d(3, 3, 3), torch.rand(1, 3, SIZE, 8), "takes 16×8 images; kensa serves square"),
        (nn.Conv2d(3, 3, 3), torch.rand(1, 3, SIZE, SIZE).double(), "input 'x' is DOUBLE"),
    ],
    ids=["wrong-classes", "no-logits", "one-channel", "not-square", "double-input"],
)
def test_misfits_are_refused_naming_what_does_not_fit(
    tmp_path: Path, model: nn.Module, example: torch.Tensor, needle: str
) -> None:
    proto = export(model.double() if example.dtype == torch.float64 else model, tmp_path / "m.onnx", example)
    with pytest.raises(IncompatibleModelError) as err:
        inspect_onnx(proto, CLASSES, SIZE)
    assert needle in str(err.value)


def test_a_file_that_is_not_onnx_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a protobuf")
    with pytest.raises(IncompatibleModelError, match="not a valid ONNX model"):
        load_onnx(bad)
