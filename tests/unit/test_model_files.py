"""Model files `kensa register` accepts besides ONNX: TorchScript, kensa checkpoints, state dicts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from kensa.models.data.ingest import load_dataset
from kensa.models.evaluation.assess_model import EvalOptions, assess_module, load_model_file
from kensa.models.evaluation.evaluate_run import BandPolicy
from kensa.models.nets.zoo import build_model
from kensa.models.onnx.foreign import IncompatibleModelError


def small_net(classes: int = 6) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, classes),
    ).eval()


def test_state_dicts_need_their_architecture_and_must_fit_it(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(build_model("small_cnn", 6, input_size=64).state_dict(), path)
    with pytest.raises(
        IncompatibleModelError, match="state dict, not a model: name its architecture with --arch"
    ):
        load_model_file(path, 6, 64)
    model, kind = load_model_file(path, 6, 64, arch="small_cnn")
    assert kind == "state dict (small_cnn)" and not model.training
    with pytest.raises(
        IncompatibleModelError, match="does not fit small_cnn with 4 classes: no matching tensor for head"
    ):
        load_model_file(path, 4, 64, arch="small_cnn")
    with pytest.raises(IncompatibleModelError, match="unknown model 'vgg'"):
        load_model_file(path, 6, 64, arch="vgg")


def test_a_torchvision_state_dict_loads_into_the_zoo_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v3_small(num_classes=6)
    path = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), path)
    model, _ = load_model_file(path, 6, 64, arch="mobilenet_v3_small")
    # Every tensor arrived (the zoo keeps torchvision's parameters under its own names).
    assert torch.equal(model.state_dict()["head.3.weight"], tv.state_dict()["classifier.3.weight"])


def test_torchscript_and_garbage(tmp_path: Path) -> None:
    ts = tmp_path / "model.ts"
    torch.jit.save(torch.jit.trace(small_net(), torch.rand(2, 3, 64, 64)), str(ts))
    model, kind = load_model_file(ts, 6, 64)
    assert kind == "TorchScript" and isinstance(model, torch.jit.ScriptModule)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(IncompatibleModelError, match="not ONNX, TorchScript or a PyTorch state dict"):
        load_model_file(junk, 6, 64)


@pytest.mark.slow
def test_torchscript_goes_through_evaluation_export_and_parity(tiny_line: Path, tmp_path: Path) -> None:
    scripted = torch.jit.trace(small_net(), torch.rand(2, 3, 64, 64))
    ds = load_dataset(tiny_line)
    options = EvalOptions(BandPolicy(alpha=0.5), max_robustness_images=16, show_progress=False)
    a = assess_module(scripted, ds, tmp_path / "run", name="ts", options=options)
    assert a.kind == "torchscript" and a.export_error is None, a.export_error
    assert a.onnx_path is not None and a.onnx_path.is_file()
    # Parity is against the TorchScript module itself, on real parts.
    assert a.parity["passed"] and a.parity["n_images"] >= 256
    assert "robustness" in a.metrics and a.parameters == sum(p.numel() for p in scripted.parameters())
