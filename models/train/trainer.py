"""Training: seeded, best epoch chosen on a validation part of its own, DDP-ready, self-describing.

The calibration split is never seen here: it sets the review band alone, so the band's guarantee holds.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from kensa import __version__
from kensa.models.data.imageprep import MAX_SIZE, Box, Fit, Preprocess, check_image_size
from kensa.models.data.ingest import DatasetVersion, ImageRecord, load_dataset
from kensa.models.data.parts import PartImages, train_augmentations
from kensa.models.data.splits import SplitItem, carve_validation
from kensa.models.nets.zoo import (
    FINETUNES,
    ZOO,
    Finetune,
    QCNet,
    build_model,
    check_finetune,
    count_parameters,
)
from kensa.models.train.cpu import configure_cpu_training
from kensa.models.train.finetune import apply_finetune, cached_taps, param_groups, set_train_mode

CHECKPOINT_NAME = "checkpoint.pt"
# /2: the architecture depends on the input size (small-input stems, see kensa.models.nets.zoo.small_input).
CHECKPOINT_FORMAT = "kensa-checkpoint/2"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; saved in the checkpoint and logged to MLflow."""

    model: str = "efficientnet_lite0"
    epochs: int = 5
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    fraction: float = 1.0  # share of the training split used (grouped sampling is per image here)
    seed: int = 0
    device: str = "cpu"
    image_size: int | None = None  # None = the dataset's own size
    # How a photo becomes the square input (kensa.models.data.imageprep): aspect kept by default.
    fit: Fit = "letterbox"
    roi: Box | None = None  # (x0, y0, x1, y1) fractions of the image, with fit "roi"
    # Share of the training split's parts held out to choose the best epoch (and stop early).
    validation_fraction: float = 0.15
    # Epochs without validation-loss improvement before stopping; None runs the whole schedule.
    # Off by default: OneCycle's last, low-LR epochs are where the model settles, and stopping in
    # the noisy high-LR middle cut accuracy from 84 % to 75 % on the demo line (small_cnn, 64 px).
    patience: int | None = None
    min_epochs: int = 4  # from scratch, the loss often rises before features form: no stop before
    balance_classes: bool = True  # weight the loss so rare defect types are not ignored
    max_minutes: float | None = None  # wall-clock budget; training stops cleanly when spent
    weights: str | None = None  # local pretrained weights file, never a download
    augment: bool = True
    optimizer: str = "adamw"  # "adamw" or "sgd" (Nesterov momentum 0.9)
    label_smoothing: float = 0.0
    # How much of a pretrained model trains (kensa.models.nets.zoo.FINETUNES): "head" (frozen
    # backbone, cached maps), "last" (the stride-16 stages too), "all". None: the model's default,
    # "head" for a pretrained rung and "all" from scratch (the only choice there).
    finetune: str | None = None

    def resolved_finetune(self) -> Finetune:
        """The rung this config trains: ``finetune`` or the model's default; ValueError if refused."""
        return check_finetune(self.model, self.finetune)

    def preprocess(self, image_size: int) -> Preprocess:
        """The image recipe of this run at ``image_size``; serving decodes with the same one."""
        return Preprocess(image_size, self.fit, self.roi)

    def validate(self) -> None:
        if self.image_size is not None:
            check_image_size(self.image_size)
        self.preprocess(self.image_size or MAX_SIZE)  # fit and roi, before any data is read
        if not 0 < self.fraction <= 1:
            msg = f"fraction must be in (0, 1], got {self.fraction}"
            raise ValueError(msg)
        if not 0 < self.validation_fraction < 0.5:
            msg = f"validation_fraction must be in (0, 0.5), got {self.validation_fraction}"
            raise ValueError(msg)
        if self.epochs < 1:
            msg = f"epochs must be at least 1, got {self.epochs}"
            raise ValueError(msg)
        if self.optimizer not in ("adamw", "sgd"):
            msg = f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}"
            raise ValueError(msg)
        if self.device not in ("cpu", "cuda"):
            msg = f"device must be 'cpu' or 'cuda', got {self.device!r}"
            raise ValueError(msg)
        if self.device == "cuda" and not torch.cuda.is_available():
            msg = "device 'cuda' requested but no CUDA device is available; use --device cpu"
            raise ValueError(msg)
        if self.finetune is not None and self.finetune not in FINETUNES:
            msg = f"finetune must be one of {', '.join(FINETUNES)}, got {self.finetune!r}"
            raise ValueError(msg)
        if self.model in ZOO:  # an unknown model is refused by build_model, naming the known ones
            self.resolved_finetune()


@dataclass
class TrainResult:
    """What a run produced: where the checkpoint is and the figures a person looks at."""

    run_dir: Path
    checkpoint: Path
    model: str
    parameters: int
    epochs_run: int
    best_epoch: int
    best_validation_loss: float
    validation_accuracy: float
    images_per_second: float
    train_seconds: float
    stopped_early: bool
    train_images: int = 0  # training examples actually used (after ``fraction``)
    history: list[dict[str, float]] = field(default_factory=list)
    finetune: str = "all"
    # "off" (trained from images), "hit" (maps read from the cache), "computed" (extracted here).
    feature_cache: str = "off"
    feature_seconds: float = 0.0  # of train_seconds: reading or extracting the cached maps
    trainable_parameters: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["run_dir"] = str(self.run_dir)
        d["checkpoint"] = str(self.checkpoint)
        return d


@dataclass
class EpochKeeper:
    """The best epoch by validation loss, the history, and when to stop: one rule for every loop."""

    config: TrainConfig
    t0: float  # perf_counter at the start of training, for ``max_minutes``
    best_loss: float = math.inf
    best_acc: float = 0.0
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False

    def end_epoch(
        self, epoch: int, train_loss: float, val_loss: float, val_acc: float, model: nn.Module
    ) -> bool:
        """Record an epoch; keep the model's state if it is the best so far. True: stop now."""
        self.history.append(
            {
                "epoch": float(epoch),
                "train_loss": train_loss,
                "validation_loss": val_loss,
                "validation_accuracy": val_acc,
            }
        )
        cfg = self.config
        if val_loss < self.best_loss - 1e-4:
            self.best_loss, self.best_acc, self.best_epoch = val_loss, val_acc, epoch
            self.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        elif cfg.patience is not None and epoch >= cfg.min_epochs and epoch - self.best_epoch >= cfg.patience:
            self.stopped_early = True
        if cfg.max_minutes and (time.perf_counter() - self.t0) / 60 > cfg.max_minutes:
            self.stopped_early = True
        return self.stopped_early

    def result(
        self,
        out_dir: Path,
        model: nn.Module,
        groups: list[dict[str, Any]],
        epochs_run: int,
        images_seen: int,
        train_images: int,
        finetune: str,
        **extra: Any,
    ) -> TrainResult:
        """The run's :class:`TrainResult` when training ends now; ``extra``: the cache's fields."""
        elapsed = time.perf_counter() - self.t0
        return TrainResult(
            run_dir=out_dir,
            checkpoint=out_dir / CHECKPOINT_NAME,
            model=self.config.model,
            parameters=count_parameters(model),
            epochs_run=epochs_run,
            best_epoch=self.best_epoch,
            best_validation_loss=self.best_loss,
            validation_accuracy=self.best_acc,
            images_per_second=images_seen / max(elapsed, 1e-9),
            train_seconds=elapsed,
            stopped_early=self.stopped_early,
            train_images=train_images,
            history=self.history,
            finetune=finetune,
            trainable_parameters=sum(p.numel() for g in groups for p in g["params"]),
            **extra,
        )


def seed_everything(seed: int) -> None:
    """Same seed, same run: Python hash-free RNGs, numpy, torch, deterministic kernels on CPU."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
        torch.backends.cudnn.benchmark = False


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextmanager
def distributed(device: str) -> Iterator[DistInfo]:
    """Join the process group when launched by ``torchrun``; a no-op in a plain process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield DistInfo()
        return
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    try:
        yield info
    finally:
        dist.destroy_process_group()


def split_tensors(
    ds: DatasetVersion, split: str, image_size: Preprocess | int, augment: bool = False
) -> PartImages:
    """A split of a dataset version as in-memory tensors, labels indexed by ``ds.classes``."""
    return record_tensors(ds, ds.split(split), image_size, augment)


def training_and_validation(
    ds: DatasetVersion, fraction: float, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """The training split, minus the parts held out to choose the epoch; and those parts."""
    records = list(ds.split("train"))
    held = carve_validation(
        [SplitItem(r.path, r.label, r.sha256, r.part_id) for r in records], fraction, seed
    )
    return (
        [r for r, h in zip(records, held, strict=True) if not h],
        [r for r, h in zip(records, held, strict=True) if h],
    )


def record_tensors(
    ds: DatasetVersion, records: Sequence[ImageRecord], image_size: Preprocess | int, augment: bool = False
) -> PartImages:
    """Images of a dataset version as in-memory tensors, labels indexed by ``ds.classes``."""
    index = {c: i for i, c in enumerate(ds.classes)}
    return PartImages(
        [r.absolute_path for r in records],
        [index[r.label] for r in records],
        image_size,
        train_augmentations() if augment else None,
    )


def dataset_image_size(ds: DatasetVersion) -> int:
    """The model input size a dataset implies: its most common image side (images are square-resized)."""
    sides = Counter(max(r.width, r.height) for r in ds.records)
    return sides.most_common(1)[0][0]


def stratified_rows(labels: np.ndarray, fraction: float, seed: int) -> list[int]:
    """Sorted rows keeping ``fraction`` of each label (at least one), so a 10 % pilot sees every type."""
    if fraction >= 1.0:
        return list(range(len(labels)))
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = max(1, math.ceil(len(idx) * fraction))
        keep.extend(rng.permutation(idx)[:n].tolist())
    return sorted(keep)


def _subset(data: PartImages, fraction: float, seed: int) -> PartImages | Subset[Any]:
    if fraction >= 1.0:
        return data
    return Subset(data, stratified_rows(data.labels.numpy(), fraction, seed))


def class_weights(labels: torch.Tensor, n_classes: int, device: str) -> torch.Tensor:
    """Inverse square-root frequency weights, normalised to mean 1.

    With 70 % ok parts, an unweighted loss is minimised early by predicting "ok" for everything;
    the square root keeps the weighting gentle enough not to flood the band with false rejects.
    """
    counts = torch.bincount(labels, minlength=n_classes).float().clamp(min=1)
    w = counts.rsqrt()
    return (w / w.mean()).to(device)


@torch.no_grad()
def predict_probs(
    model: nn.Module, images: torch.Tensor, device: str = "cpu", batch_size: int = 64
) -> np.ndarray:
    """Softmax probabilities (N, C) for uint8 images (N, 3, H, W)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device).float().div_(255.0)
        out.append(torch.softmax(model(x).float(), dim=1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def _validation_loss(model: nn.Module, data: PartImages, device: str) -> tuple[float, float]:
    probs = predict_probs(model, data.images, device)
    labels = data.labels.numpy()
    p_true = np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0)
    return float(-np.log(p_true).mean()), float((probs.argmax(1) == labels).mean())


def train(
    data_root: Path,
    config: TrainConfig,
    out_dir: Path,
    show_progress: bool = True,
    cache_dir: Path | None = None,
) -> TrainResult:
    """Train ``config.model`` on the dataset at ``data_root``; write ``out_dir/checkpoint.pt``.

    Works unchanged under ``torchrun``: each rank sees its shard of the training split, gradients
    are averaged by DDP, and rank 0 alone evaluates, prints and writes. Finetune ``head`` and
    ``last`` train on frozen-backbone maps, read from ``cache_dir`` when an earlier run left them
    there (see :func:`kensa.models.train.feature_cache.feature_cache_dir`); None extracts them
    for this run only.
    """
    config.validate()
    finetune = config.resolved_finetune()
    ds = load_dataset(data_root)
    image_size = config.image_size or dataset_image_size(ds)
    with distributed(config.device) as info:
        configure_cpu_training(processes=info.world_size)
        seed_everything(config.seed)
        device = f"cuda:{info.local_rank}" if config.device == "cuda" else "cpu"
        if cached_taps(finetune):
            # Imported here: that module builds on this one's records, results and checkpoint.
            from kensa.models.train.from_features import train_from_features

            return train_from_features(
                ds, config, finetune, image_size, out_dir, info, device, cache_dir, show_progress
            )
        train_records, val_records = training_and_validation(ds, config.validation_fraction, config.seed)
        train_full = record_tensors(ds, train_records, config.preprocess(image_size), augment=config.augment)
        val = record_tensors(ds, val_records, config.preprocess(image_size))
        train_data = _subset(train_full, config.fraction, config.seed)

        model: nn.Module = build_model(
            config.model,
            len(ds.classes),
            Path(config.weights) if config.weights else None,
            input_size=image_size,
        ).to(device)
        apply_finetune(model, finetune)
        use_cuda = config.device == "cuda"
        if use_cuda:
            model = model.to(memory_format=torch.channels_last)  # faster convs with AMP
        net = model
        if info.world_size > 1:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[info.local_rank] if use_cuda else None
            )
        sampler: DistributedSampler[Any] | None = (
            DistributedSampler(train_data, info.world_size, info.rank, shuffle=True, seed=config.seed)
            if info.world_size > 1
            else None
        )
        generator = torch.Generator().manual_seed(config.seed)
        loader = DataLoader(
            train_data,
            batch_size=config.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            generator=generator if sampler is None else None,
            drop_last=len(train_data) > config.batch_size,
        )
        groups = param_groups(model, finetune, config.lr)
        opt = make_optimizer(config, groups)
        steps = max(1, config.epochs * len(loader))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=steps)
        scaler = torch.amp.GradScaler("cuda", enabled=use_cuda)
        loss_fn = nn.CrossEntropyLoss(
            weight=class_weights(train_full.labels, len(ds.classes), device)
            if config.balance_classes
            else None,
            label_smoothing=config.label_smoothing,
        )

        seen, t0 = 0, time.perf_counter()
        keeper = EpochKeeper(config, t0)
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} batches"),
            TextColumn("{task.fields[rate]:.0f} img/s  loss {task.fields[loss]:.3f}"),
            TimeElapsedColumn(),
            disable=not (show_progress and info.is_main),
        )
        epoch = 0
        with progress:
            task = progress.add_task(f"train {config.model}", total=steps, rate=0.0, loss=float("nan"))
            for epoch in range(1, config.epochs + 1):
                if sampler is not None:
                    sampler.set_epoch(epoch)
                net.train()
                set_train_mode(model)  # a pretrained trunk's BatchNorm keeps ImageNet statistics
                running = 0.0
                for x, y in loader:
                    x, y = x.to(device), y.to(device)
                    if use_cuda:
                        x = x.contiguous(memory_format=torch.channels_last)
                    autocast = torch.autocast("cuda", dtype=torch.float16) if use_cuda else nullcontext()
                    with autocast:
                        loss = loss_fn(net(x), y)
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    sched.step()
                    seen += len(x) * info.world_size
                    running += loss.item()
                    rate = seen / max(time.perf_counter() - t0, 1e-9)
                    progress.update(task, advance=1, rate=rate, loss=loss.item())
                val_loss, val_acc = _validation_loss(model, val, device)
                if keeper.end_epoch(epoch, running / max(1, len(loader)), val_loss, val_acc, model):
                    break
        result = keeper.result(out_dir, model, groups, epoch, seen, len(train_data), finetune)
        if info.is_main:
            save_checkpoint(
                result, config, ds, image_size, keeper.best_state or model.state_dict(), provenance(model)
            )
        return result


def make_optimizer(config: TrainConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """AdamW or Nesterov SGD over parameter ``groups`` (each with its own ``lr``)."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def provenance(model: nn.Module) -> dict[str, Any] | None:
    """Name and sha256 of the pretrained weights ``model`` started from (None: from scratch)."""
    return model.provenance if isinstance(model, QCNet) else None


def save_checkpoint(
    result: TrainResult,
    config: TrainConfig,
    ds: DatasetVersion,
    image_size: int,
    state: dict[str, torch.Tensor],
    backbone: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint that describes itself: model, classes, input size, config, data, metrics.

    ``backbone`` is the provenance of pretrained weights (name, sha256); the config records the
    finetune rung actually trained, not None.
    """
    result.run_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_name": config.model,
        "classes": list(ds.classes),
        "input_size": image_size,
        "config": {**asdict(config), "finetune": config.resolved_finetune()},
        "backbone": backbone,
        "dataset_version": ds.version,
        "dataset_root": str(ds.root.resolve()),
        "code_version": __version__,
        "metrics": {k: v for k, v in result.to_dict().items() if k != "history"},
        "history": result.history,
        "state_dict": state,
    }
    tmp = result.checkpoint.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, result.checkpoint)
    (result.run_dir / "train.json").write_text(json.dumps(result.to_dict(), indent=2))
    return result.checkpoint


@dataclass
class LoadedModel:
    """A trained model with the description its checkpoint carries."""

    model: nn.Module
    model_name: str
    classes: list[str]
    input_size: int
    config: dict[str, Any]
    dataset_version: str
    dataset_root: Path
    metrics: dict[str, Any]
    backbone: dict[str, Any] | None = None  # pretrained weights' name and sha256; None: from scratch


def load_checkpoint(run_dir: Path) -> LoadedModel:
    """Rebuild the model of a run directory (or a checkpoint file) in eval mode on the CPU."""
    path = run_dir / CHECKPOINT_NAME if run_dir.is_dir() else run_dir
    if not path.is_file():
        msg = f"no checkpoint at {path}; run `kensa train ... --out {run_dir}` first"
        raise FileNotFoundError(msg)
    payload = torch.load(path, map_location="cpu", weights_only=False)
    # A /1 checkpoint predates size-dependent stems: it was trained with the stock architecture.
    arch_size = None if payload.get("format") == "kensa-checkpoint/1" else payload["input_size"]
    # pretrained=False: the state dict holds every weight, so the shipped file is not needed here.
    model = build_model(
        payload["model_name"], len(payload["classes"]), input_size=arch_size, pretrained=False
    )
    model.load_state_dict(payload["state_dict"])
    model.provenance = payload.get("backbone")
    model.eval()
    return LoadedModel(
        model=model,
        model_name=payload["model_name"],
        classes=list(payload["classes"]),
        input_size=int(payload["input_size"]),
        config=dict(payload["config"]),
        dataset_version=payload["dataset_version"],
        dataset_root=Path(payload["dataset_root"]),
        metrics=dict(payload["metrics"]),
        backbone=payload.get("backbone"),
    )
