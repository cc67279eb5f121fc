"""The model zoo: a ladder of models by cost, built for a dataset's classes.

Two kinds of rung: pretrained ImageNet backbones that ship with the install (``efficientnet_lite0``,
``mobilenet_v2``), cut at mid-level taps with a small spatial head (:mod:`kensa.models.nets.spatial`)
and fine-tuned as ``finetune`` says (``head``, ``last`` or ``all``); and from-scratch models (the
small CNNs and torchvision architectures) kept as comparisons, which can only train ``all``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn
from torchvision import models as tvm

from kensa.models.nets.smallnet import small_cnn_backbone
from kensa.models.nets.spatial import build_spatial

# ImageNet statistics: torchvision backbones (and any local pretrained weights) expect them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# How much of a pretrained rung trains, cheapest first: neck and head on cached frozen maps; also
# the stride-8 → stride-16 stages, on cached stride-4 and stride-8 maps; everything, from images.
Finetune = Literal["head", "last", "all"]
FINETUNES: tuple[Finetune, ...] = ("head", "last", "all")


class UnknownModelError(ValueError):
    """A model name that is not in the zoo."""


class QCNet(nn.Module):
    """A classifier split into embedding and head, with normalisation inside.

    ``forward`` takes float images in [0, 1], shape (B, 3, H, W), and returns class logits (B, C).
    Keeping normalisation in the module means the exported ONNX graph carries it, and ``embed``
    exposes the pooled embedding (B, D) that the drift monitor projects to a few dimensions.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        embedding_dim: int,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.embedding_dim = embedding_dim
        # The statistics the backbone's weights expect (Lite0: 0.5/0.5, torchvision: ImageNet's).
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        # Name and sha256 of the pretrained weights it was built from (None: from scratch).
        self.provenance: dict[str, Any] | None = None

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (B, 3, H, W) as the backbone's weights expect them."""
        return (x - self.mean) / self.std

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.backbone(self.normalise(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


@dataclass(frozen=True)
class ZooEntry:
    """One rung of the size ladder."""

    name: str
    build: Callable[[int, bool], QCNet] | None  # None: a pretrained rung, built from its backbone
    description: str
    pretrained: str | None = None  # catalogue backbone name of a pretrained rung


# Inputs at or below this side get a small-input stem: the first stride-2 stage is dropped, so a
# 128-px image ends at 8x8 instead of 4x4 and a few-pixel defect still reaches the head.
# Off: removing the first downsampling of the torchvision stems at 64–128 px cost 2–4× compute
# and bought no accuracy on the synthetic line (0.72 → 0.75 test accuracy at 128 px, 2,500
# parts); the small CNN rung is what learns there. Raise it to try the stems again.
SMALL_INPUT_MAX = 0


def small_input(input_size: int | None) -> bool:
    """Whether a model for ``input_size`` px gets the small-input stem (None: the stock stem)."""
    return input_size is not None and input_size <= SMALL_INPUT_MAX


def _first_conv_stride_one(features: nn.Module) -> None:
    stem = features[0]  # type: ignore[index]
    conv = stem[0]
    assert isinstance(conv, nn.Conv2d)
    conv.stride = (1, 1)


def _mobilenet(ctor: Callable[..., tvm.MobileNetV3], num_classes: int, small: bool) -> QCNet:
    net = ctor(weights=None)
    if small:
        _first_conv_stride_one(net.features)
    backbone = nn.Sequential(net.features, net.avgpool)
    head = net.classifier
    last = head[-1]
    assert isinstance(last, nn.Linear)
    head[-1] = nn.Linear(last.in_features, num_classes)
    first = head[0]
    assert isinstance(first, nn.Linear)
    return QCNet(backbone, head, first.in_features)


def _resnet(ctor: Callable[..., tvm.ResNet], num_classes: int, small: bool) -> QCNet:
    net = ctor(weights=None)
    if small:
        net.maxpool = nn.Identity()  # parameter-free: state dicts stay interchangeable
    backbone = nn.Sequential(*(m for name, m in net.named_children() if name != "fc"))
    return QCNet(backbone, nn.Linear(net.fc.in_features, num_classes), net.fc.in_features)


def _efficientnet(ctor: Callable[..., tvm.EfficientNet], num_classes: int, small: bool) -> QCNet:
    net = ctor(weights=None)
    if small:
        _first_conv_stride_one(net.features)
    backbone = nn.Sequential(net.features, net.avgpool)
    last = net.classifier[-1]
    assert isinstance(last, nn.Linear)
    head = nn.Sequential(net.classifier[0], nn.Linear(last.in_features, num_classes))
    return QCNet(backbone, head, last.in_features)


def _plain_cnn(width: int) -> Callable[[int, bool], QCNet]:
    def build(num_classes: int, small: bool) -> QCNet:
        del small  # built for small inputs already
        backbone, dim = small_cnn_backbone(width=width)
        return QCNet(backbone, nn.Linear(dim, num_classes), dim)

    return build


def _pretrained(name: str, num_classes: int, load_weights: bool, weights: Path | None) -> QCNet:
    parts = build_spatial(name, num_classes, load_weights=load_weights, weights=weights)
    model = QCNet(parts.backbone, parts.head, parts.embedding_dim, parts.mean, parts.std)
    model.provenance = parts.provenance
    return model


# Pretrained rungs first (the ones a QC lead is offered), then from-scratch ones smallest to
# largest. Parameters with 6 classes: ~0.80M (Lite0 to stage 4, 0.10M of it neck and head),
# ~0.64M (MobileNetV2 to features[13]); ~0.17M, ~0.7M, ~1.5M, ~4.2M, ~4.0M, ~11.2M, ~23.5M.
ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry(
            "efficientnet_lite0",
            None,
            "ImageNet EfficientNet-Lite0 to stride 16 + spatial head",
            pretrained="efficientnet_lite0",
        ),
        ZooEntry(
            "mobilenet_v2",
            None,
            "ImageNet MobileNetV2 to stride 16 + spatial head",
            pretrained="mobilenet_v2",
        ),
        ZooEntry("tiny_cnn", _plain_cnn(12), "~0.17M plain CNN, half the small CNN's width"),
        ZooEntry("small_cnn", _plain_cnn(24), "~0.7M plain CNN for small inputs"),
        ZooEntry("mobilenet_v3_small", lambda c, s: _mobilenet(tvm.mobilenet_v3_small, c, s), "~1M"),
        ZooEntry("mobilenet_v3_large", lambda c, s: _mobilenet(tvm.mobilenet_v3_large, c, s), "~4M"),
        ZooEntry("efficientnet_b0", lambda c, s: _efficientnet(tvm.efficientnet_b0, c, s), "~4M"),
        ZooEntry("resnet18", lambda c, s: _resnet(tvm.resnet18, c, s), "~11M"),
        ZooEntry("resnet50", lambda c, s: _resnet(tvm.resnet50, c, s), "~24M"),
    )
}


def model_names() -> list[str]:
    """Zoo names: pretrained rungs, then from-scratch ones smallest first."""
    return list(ZOO)


def is_pretrained(name: str) -> bool:
    """Whether zoo model ``name`` starts from shipped ImageNet weights (and so can freeze layers)."""
    return name in ZOO and ZOO[name].pretrained is not None


def check_finetune(name: str, finetune: str | None) -> Finetune:
    """The finetune rung ``name`` trains with: ``finetune``, or its default (None).

    Default: ``head`` for a pretrained rung (the cheapest), ``all`` from scratch. A from-scratch
    model has no pretrained layers to freeze, so ``head``/``last`` are refused for it.
    """
    if finetune is not None and finetune not in FINETUNES:
        msg = f"finetune must be one of {', '.join(FINETUNES)}; got {finetune!r}"
        raise ValueError(msg)
    if not is_pretrained(name):
        if finetune not in (None, "all"):
            pretrained = ", ".join(n for n in ZOO if is_pretrained(n))
            msg = (
                f"model {name!r} trains from scratch, so only finetune 'all' applies (got {finetune!r}); "
                f"finetune 'head' and 'last' need a pretrained model: {pretrained}"
            )
            raise ValueError(msg)
        return "all"
    return cast(Finetune, finetune or "head")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(
    name: str,
    num_classes: int,
    weights: Path | None = None,
    input_size: int | None = None,
    pretrained: bool = True,
) -> QCNet:
    """Build a zoo model for ``num_classes`` classes, optionally from a local weights file.

    A pretrained rung loads its shipped ImageNet weights (hash-checked), or ``weights`` as a
    user's own file for the same backbone; ``pretrained=False`` builds the architecture only, for
    a checkpoint's state dict to fill.

    ``input_size`` (the square input side) picks the stem: at or below :data:`SMALL_INPUT_MAX`
    px the first downsampling is removed (MobileNet/EfficientNet stem conv at stride 1, ResNet
    without its max-pool); ``None`` keeps the stock torchvision stem. The parameters are the same
    either way, so weights and state dicts load into both.

    ``weights`` is a local state dict (a torchvision checkpoint or a kensa checkpoint); nothing is
    ever downloaded. Tensors whose shape does not fit (the class head) are skipped, so ImageNet
    weights initialise the backbone of a 6-class model.
    """
    if name not in ZOO:
        msg = f"unknown model {name!r}; known models: {', '.join(model_names())}"
        raise UnknownModelError(msg)
    if num_classes < 2:
        msg = f"a QC model needs at least 2 classes, got {num_classes}"
        raise ValueError(msg)
    entry = ZOO[name]
    if entry.pretrained is not None:
        # The ImageNet BatchNorm statistics and momentum stay as trained; a pretrained trunk's
        # normalisation layers run in eval mode while fine-tuning (kensa.models.train.finetune).
        return _pretrained(entry.pretrained, num_classes, pretrained, weights)
    assert entry.build is not None
    model = entry.build(num_classes, small_input(input_size))
    for m in model.modules():
        # torchvision's MobileNet/EfficientNet use BN momentum 0.01, tuned for 600 ImageNet epochs;
        # a short from-scratch run then evaluates with running statistics far from the truth.
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    if weights is not None:
        load_local_weights(model, weights)
    return model


def load_local_weights(model: QCNet, path: Path) -> list[str]:
    """Load matching tensors from a local file; return the names of skipped tensors."""
    if not path.is_file():
        msg = f"weights file {path} does not exist (kensa never downloads weights)"
        raise FileNotFoundError(msg)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = model.state_dict()
    # Map torchvision key names (features.0..., fc.weight) onto QCNet's (backbone.0.0..., head...).
    translated = _translate_torchvision_keys(state, own)
    usable = {k: v for k, v in translated.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    if not usable:
        msg = f"no tensor in {path} matches the architecture; is it for a different model?"
        raise ValueError(msg)
    return sorted(set(own) - set(usable))


def _translate_torchvision_keys(
    state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    if any(k.startswith(("backbone.", "head.")) for k in state):
        return state  # already a kensa state dict
    out: dict[str, torch.Tensor] = {}
    resnet_children = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    for key, value in state.items():
        first, _, rest = key.partition(".")
        if first == "features":
            out[f"backbone.0.{rest}"] = value
        elif first == "classifier" or first == "fc":
            out[f"head.{rest}"] = value
        elif first in resnet_children:
            out[f"backbone.{resnet_children.index(first)}.{rest}"] = value
    return {k: v for k, v in out.items() if k in own}
