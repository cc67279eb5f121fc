"""Training on cached frozen-backbone maps (finetune ``head`` and ``last``): the cheap rungs of the ladder.

The frozen trunk runs once per dataset version, not once per epoch and trial, so the trained part
(neck and head; with ``last`` also the stride-16 stages) can take many epochs for the cost of a
few. Everything else is the image loop's: the same validation parts, class balance, optimizer,
OneCycle schedule, seed, best-epoch choice and self-describing checkpoint.

Augmentation: flips act on the cached maps, per sample and per epoch (all the tapped
maps of a part flipped together). A flip of the maps is not exactly the maps of the flipped image
(kernels and "SAME" padding are not symmetric), but it is the same defect at the mirrored place,
which is what the flip teaches. Colour jitter cannot be applied here: brightness and contrast act on
pixels before a dozen nonlinear layers, and no transform of the maps reproduces their effect; the
frozen trunk's ImageNet features and the corruption suite's measurements stand in for it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from kensa.models.data.ingest import DatasetVersion
from kensa.models.nets.zoo import Finetune, QCNet, build_model
from kensa.models.train.feature_cache import FeatureKey, FeatureMaps, feature_maps
from kensa.models.train.finetune import (
    FromMaps,
    apply_finetune,
    cached_taps,
    param_groups,
    set_train_mode,
    tap_channels,
    trunk_maps,
)
from kensa.models.train.trainer import (
    DistInfo,
    EpochKeeper,
    TrainConfig,
    TrainResult,
    class_weights,
    make_optimizer,
    record_tensors,
    save_checkpoint,
    stratified_rows,
    training_and_validation,
)

VALIDATION_BATCH = 256


def _flip(maps: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """Each sample's maps flipped horizontally and vertically, each with probability 1/2."""
    b = maps[0].shape[0]
    h = (torch.rand(b, generator=generator) < 0.5).to(maps[0].device).view(b, 1, 1, 1)
    v = (torch.rand(b, generator=generator) < 0.5).to(maps[0].device).view(b, 1, 1, 1)
    out = []
    for m in maps:  # (B, C, h, w): the same flips for every tap of a sample
        m = torch.where(h, m.flip(-1), m)
        out.append(torch.where(v, m.flip(-2), m))
    return out


@torch.no_grad()
def _validate(
    step: FromMaps, maps: list[torch.Tensor], labels: torch.Tensor, device: str
) -> tuple[float, float]:
    """Validation loss (mean −log p of the true class, as the image loop) and accuracy."""
    step.eval()
    probs = []
    for i in range(0, len(labels), VALIDATION_BATCH):
        batch = [m[i : i + VALIDATION_BATCH].to(device).float() for m in maps]
        probs.append(torch.softmax(step(*batch).float(), dim=1).cpu())
    p = torch.cat(probs).numpy()
    y = labels.numpy()
    p_true = np.clip(p[np.arange(len(y)), y], 1e-7, 1.0)
    return float(-np.log(p_true).mean()), float((p.argmax(1) == y).mean())


def _cached_maps(
    ds: DatasetVersion,
    config: TrainConfig,
    model: QCNet,
    finetune: Finetune,
    image_size: int,
    cache_dir: Path | None,
    info: DistInfo,
) -> tuple[FeatureMaps, list[str]]:
    records = ds.split("train")
    paths = [r.path for r in records]
    recipe = config.preprocess(image_size)
    taps = cached_taps(finetune)
    assert model.provenance is not None
    key = FeatureKey(
        dataset_version=ds.version,
        backbone=model.provenance["name"],
        weights_sha256=model.provenance["sha256"],
        image_size=image_size,
        preprocess=recipe.to_dict(),
        taps=tap_channels(model, taps),
    )

    def images() -> torch.Tensor:
        return record_tensors(ds, records, recipe).images  # (N, 3, S, S) uint8

    def extract(batch: torch.Tensor) -> list[torch.Tensor]:
        return trunk_maps(model, batch, taps)

    # Under DDP rank 0 extracts and writes; the others wait, then read its file.
    if info.world_size > 1 and not info.is_main:
        dist.barrier()
    model.eval()
    found = feature_maps(key, paths, images, extract, cache_dir)
    if info.world_size > 1 and info.is_main:
        dist.barrier()
    return found, paths


def train_from_features(
    ds: DatasetVersion,
    config: TrainConfig,
    finetune: Finetune,
    image_size: int,
    out_dir: Path,
    info: DistInfo,
    device: str,
    cache_dir: Path | None,
    show_progress: bool,
) -> TrainResult:
    """Train the layers above the cached maps of ``config.model``; write the whole model's checkpoint.

    ``train_seconds`` counts the maps' extraction (or reading) as well as the epochs;
    ``images_per_second`` is training images seen per second of it.
    """
    t0 = time.perf_counter()
    model = build_model(config.model, len(ds.classes), Path(config.weights) if config.weights else None).to(
        device
    )
    found, paths = _cached_maps(ds, config, model, finetune, image_size, cache_dir, info)
    row = {p: i for i, p in enumerate(paths)}
    index = ds.class_index
    train_records, val_records = training_and_validation(ds, config.validation_fraction, config.seed)
    train_rows = torch.tensor([row[r.path] for r in train_records], dtype=torch.long)
    train_labels = torch.tensor([index[r.label] for r in train_records], dtype=torch.long)
    keep = torch.tensor(stratified_rows(train_labels.numpy(), config.fraction, config.seed))
    train_rows, used_labels = train_rows[keep], train_labels[keep]
    val_rows = torch.tensor([row[r.path] for r in val_records], dtype=torch.long)
    val_labels = torch.tensor([index[r.label] for r in val_records], dtype=torch.long)
    # Maps stay float16 (on the device: a few hundred MB at most) and become float32 per batch.
    train_maps = [m[train_rows].to(device) for m in found.maps]
    val_maps = [m[val_rows] for m in found.maps]
    found.maps = []  # the training and validation rows are copies; free the full set

    apply_finetune(model, finetune)
    step = FromMaps(model)
    net: nn.Module = step
    if info.world_size > 1:
        net = nn.parallel.DistributedDataParallel(
            step, device_ids=[info.local_rank] if device.startswith("cuda") else None
        )
    rows = TensorDataset(torch.arange(len(train_rows)))  # positions in train_maps
    sampler: DistributedSampler[Any] | None = (
        DistributedSampler(rows, info.world_size, info.rank, shuffle=True, seed=config.seed)
        if info.world_size > 1
        else None
    )
    generator = torch.Generator().manual_seed(config.seed)
    # The loader yields index batches; each batch of maps is gathered in one indexing op.
    loader: DataLoader[tuple[torch.Tensor, ...]] = DataLoader(
        rows,
        batch_size=config.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator if sampler is None else None,
        drop_last=len(rows) > config.batch_size,
    )
    flips = torch.Generator().manual_seed(config.seed + 1)
    groups = param_groups(model, finetune, config.lr)
    opt = make_optimizer(config, groups)
    steps = max(1, config.epochs * len(loader))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=steps)
    loss_fn = nn.CrossEntropyLoss(
        weight=class_weights(used_labels, len(ds.classes), device) if config.balance_classes else None,
        label_smoothing=config.label_smoothing,
    )
    used_labels = used_labels.to(device)

    seen, epoch = 0, 0
    keeper = EpochKeeper(config, t0)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} batches"),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        disable=not (show_progress and info.is_main),
    )
    with progress:
        task = progress.add_task(f"train {config.model} ({finetune})", total=steps, loss=float("nan"))
        for epoch in range(1, config.epochs + 1):
            if sampler is not None:
                sampler.set_epoch(epoch)
            net.train()
            set_train_mode(model)
            running = 0.0
            for (batch,) in loader:
                batch = batch.to(device)
                maps = [m[batch].float() for m in train_maps]
                if config.augment:
                    maps = _flip(maps, flips)
                loss = loss_fn(net(*maps), used_labels[batch])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                seen += len(batch) * info.world_size
                running += loss.item()
                progress.update(task, advance=1, loss=loss.item())
            val_loss, val_acc = _validate(step, val_maps, val_labels, device)
            if keeper.end_epoch(epoch, running / max(1, len(loader)), val_loss, val_acc, model):
                break
    result = keeper.result(
        out_dir,
        model,
        groups,
        epoch,
        seen,
        len(rows),
        finetune,
        feature_cache=found.source,
        feature_seconds=found.seconds,
    )
    if info.is_main:
        state = keeper.best_state or model.state_dict()
        save_checkpoint(result, config, ds, image_size, state, model.provenance)
    return result
