"""Data scientists' own models through the flows' gates: open a dataset, log a module, register a file.

A model trained in a notebook or exported by another tool is held to the bar of a flow-made one:
the same dataset version, QC evaluation and review band, corruption suite, KPI gate, ONNX parity,
MLflow records and registry tags, and the same human approval before it reaches the line. A model
that misses a gate stays visible in MLflow with the reason and gets no alias.
"""

from __future__ import annotations

import copy
import getpass
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kensa.flows.config import ProjectConfig, load_project_config
from kensa.flows.experiment_record import ExperimentResult, gate_and_record
from kensa.models.data.ingest import DatasetVersion, load_dataset
from kensa.models.data.parts import PartImages, load_image
from kensa.models.evaluation.assess_model import (
    Assessment,
    EvalOptions,
    assess_module,
    assess_onnx,
    check_module_output,
    load_model_file,
)
from kensa.models.nets.zoo import IMAGENET_MEAN, IMAGENET_STD
from kensa.models.onnx.adapt import check_normalisation
from kensa.models.onnx.foreign import IncompatibleModelError, inspect_onnx, load_onnx
from kensa.models.train.trainer import dataset_image_size, split_tensors
from kensa.settings import Settings

__all__ = [
    "ExperimentData",
    "ExperimentResult",
    "IncompatibleModelError",
    "log_experiment",
    "open_dataset",
    "register_model",
]


@dataclass(frozen=True)
class ExperimentData:
    """A dataset version as torch datasets with the project's transforms and image size.

    Items are (float [0,1] image (3, S, S), class index); class indices follow ``classes``
    (``ok`` first), the order a model's logits must follow.
    """

    dataset: DatasetVersion
    image_size: int

    @property
    def version(self) -> str:
        return self.dataset.version

    @property
    def classes(self) -> tuple[str, ...]:
        return self.dataset.classes

    @property
    def root(self) -> Path:
        return self.dataset.root

    def split(self, name: str, augment: bool = False) -> PartImages:
        """One split (train, calibration, test) decoded into memory, optionally augmented."""
        return split_tensors(self.dataset, name, self.image_size, augment=augment)

    def train(self, augment: bool = True) -> PartImages:
        """The training split with kensa's training augmentations (flips, mild lighting jitter)."""
        return self.split("train", augment=augment)

    def calibration(self) -> PartImages:
        return self.split("calibration")

    def test(self) -> PartImages:
        return self.split("test")

    def __repr__(self) -> str:
        counts = {s: len(self.dataset.split(s)) for s in ("train", "calibration", "test")}
        return (
            f"ExperimentData(version={self.dataset.short_version}, classes={list(self.classes)}, "
            f"image_size={self.image_size}, splits={counts})"
        )


def open_dataset(path: str | Path, *, image_size: int | None = None, verify: bool = False) -> ExperimentData:
    """Open a dataset version written by ``kensa data ingest`` (``verify`` re-hashes every file)."""
    ds = load_dataset(Path(path), verify=verify)
    return ExperimentData(ds, image_size or dataset_image_size(ds))


def _resolve(
    dataset: ExperimentData | DatasetVersion | str | Path,
    config: ProjectConfig | str | Path | None,
    settings: Settings | None,
) -> tuple[ExperimentData, ProjectConfig, Settings]:
    settings = settings or Settings()
    if isinstance(config, ProjectConfig):
        project = config
    else:
        project = load_project_config(Path(config) if config else settings.project_config)
    if isinstance(dataset, ExperimentData):
        data = dataset
    elif isinstance(dataset, DatasetVersion):
        data = ExperimentData(dataset, dataset_image_size(dataset))
    else:
        data = open_dataset(dataset)
    return data, project, settings


def _first_images(data: ExperimentData, n: int = 2) -> torch.Tensor:
    """A few calibration images (uint8 (n, 3, S, S)) to check a model's shapes before any work."""
    records = data.dataset.split("calibration")[:n]
    return torch.stack([load_image(r.absolute_path, data.image_size) for r in records])


def log_experiment(
    model: nn.Module,
    *,
    dataset: ExperimentData | DatasetVersion | str | Path,
    name: str,
    params: Mapping[str, Any] | None = None,
    registered_by: str | None = None,
    config: ProjectConfig | str | Path | None = None,
    settings: Settings | None = None,
    show_progress: bool = True,
) -> ExperimentResult:
    """Put a PyTorch model through kensa's gates and, if it passes, register it as ``candidate``.

    ``model`` takes float images in [0, 1], shape (N, 3, S, S) with S the dataset's image size
    (``open_dataset(...).image_size``; normalisation belongs inside the module) and returns class
    logits (N, C) in the dataset's class order. A CPU copy is evaluated; yours is left untouched.
    ``params`` are logged as MLflow params and ride in the ONNX metadata. The KPI comes from the
    project config (``config``, else ``settings.project_config``, else the defaults).

    Raises IncompatibleModelError, before anything is logged, if the model does not fit the data.
    """
    data, project, settings = _resolve(dataset, config, settings)
    net = copy.deepcopy(model).cpu().eval()
    check_module_output(net, _first_images(data), data.classes)
    config_meta = {"source": "experiment", "params": dict(params or {})}

    return gate_and_record(
        _module_runner(net, data, name, config_meta),
        dataset=data.dataset,
        name=name,
        params=params or {},
        registered_by=registered_by or getpass.getuser(),
        project=project,
        settings=settings,
        source="experiment",
        show_progress=show_progress,
    )


def _module_runner(
    net: nn.Module, data: ExperimentData, name: str, config: dict[str, Any]
) -> Callable[[EvalOptions, Path], Assessment]:
    """Evaluation of a torch module on ``data``, in the form ``gate_and_record`` calls."""

    def run(options: EvalOptions, run_dir: Path) -> Assessment:
        return assess_module(
            net, data.dataset, run_dir, name=name, options=options, input_size=data.image_size, config=config
        )

    return run


def register_model(
    path: str | Path,
    *,
    dataset: ExperimentData | DatasetVersion | str | Path,
    name: str | None = None,
    arch: str | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    params: Mapping[str, Any] | None = None,
    registered_by: str | None = None,
    config: ProjectConfig | str | Path | None = None,
    settings: Settings | None = None,
    show_progress: bool = True,
) -> ExperimentResult:
    """Put an existing model file through kensa's gates; register it as ``candidate`` if it passes.

    ``path``: an ONNX file (float or uint8 input, NCHW or NHWC, logits or probabilities out; it is
    wrapped to kensa's uint8 NHWC contract with ``mean``/``std`` normalisation inside the graph),
    a TorchScript file, a kensa checkpoint, or a state dict of the zoo architecture ``arch``.
    Raises IncompatibleModelError, before anything is logged, naming what does not fit.
    """
    path = Path(path)
    data, project, settings = _resolve(dataset, config, settings)
    label = name or path.stem
    meta = {"source": "register", "file": path.name, "params": dict(params or {})}
    run: Callable[[EvalOptions, Path], Assessment]
    if path.suffix.lower() == ".onnx":
        check_normalisation(mean, std)
        inspect_onnx(load_onnx(path), data.classes, data.image_size)

        def run(options: EvalOptions, run_dir: Path) -> Assessment:
            return assess_onnx(
                path, data.dataset, run_dir, name=label, options=options, mean=mean, std=std, config=meta
            )

        described = {"file": path.name, "file_kind": "ONNX", "mean": list(mean), "std": list(std)}
    else:
        net, kind = load_model_file(path, len(data.classes), data.image_size, arch)
        check_module_output(net, _first_images(data), data.classes)
        meta["file_kind"] = kind

        run = _module_runner(net, data, label, meta)
        described = {"file": path.name, "file_kind": kind}
    result = gate_and_record(
        run,
        dataset=data.dataset,
        name=label,
        params={**described, **(params or {})},
        registered_by=registered_by or getpass.getuser(),
        project=project,
        settings=settings,
        source="register",
        show_progress=show_progress,
    )
    result.extra["file_kind"] = described["file_kind"]
    return result
