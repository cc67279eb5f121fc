"""What retraining starts from: the champion, the data it was trained on, the review queue's labels."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import mlflow
from mlflow.tracking import MlflowClient
from sqlalchemy import select

from kensa.models.data.ingest import load_dataset
from kensa.models.data.reviewed import LabelledImage
from kensa.models.data.validate import DatasetError
from kensa.models.onnx.contract import read_metadata, sha256_file
from kensa.models.train.trainer import TrainConfig
from kensa.registry import ALIAS_CHAMPION, ONNX_FILE, TAG_DATASET_VERSION, TAG_SHA256
from kensa.settings import Settings
from kensa.store.connect import open_store
from kensa.store.models import Prediction, ReviewItem

# A review label that means "I could not tell": never training data.
UNSURE = "unsure"


class RetrainError(RuntimeError):
    """Retraining cannot start: no champion, its data cannot be found, or it has no recipe."""


@dataclass(frozen=True)
class Champion:
    """The model in service, downloaded from the registry, with the data version it learned from."""

    name: str
    version: str
    run_id: str | None
    dataset_version: str
    onnx_path: Path
    metadata: dict[str, Any]

    def recipe(self, *, seed: int, device: str) -> TrainConfig:
        """The champion's training config, on all of the new data, at its input size.

        Same model, epochs, optimiser and schedule; ``fraction`` becomes 1 because the point of
        retraining is to learn from every new label (a sweep's data fraction was a cost choice).
        """
        raw = self.metadata.get("training_config")
        if not isinstance(raw, dict) or "model" not in raw:
            raise RetrainError(
                f"{self.name}/{self.version} carries no training recipe (ONNX metadata "
                "'training_config'); retrain only models kensa trained, or run `kensa pilot`"
            )
        known = set(TrainConfig.__dataclass_fields__)
        config = {k: v for k, v in raw.items() if k in known}
        config.update(fraction=1.0, seed=seed, device=device, image_size=int(self.metadata["input_size"]))
        return TrainConfig(**config)


def load_champion(client: MlflowClient, name: str, dst: Path) -> Champion:
    """Download the champion's ONNX file into ``dst`` and check it is the registered one."""
    try:
        mv = client.get_model_version_by_alias(name, ALIAS_CHAMPION)
    except mlflow.exceptions.MlflowException:
        raise RetrainError(
            f"{name} has no champion to retrain from; approve a model first "
            "(kensa approve VERSION --by NAME --reason TEXT)"
        ) from None
    dst.mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(f"models:/{name}/{mv.version}", dst_path=str(dst))
    onnx_path = Path(local) / ONNX_FILE
    expected = mv.tags.get(TAG_SHA256)
    if expected and sha256_file(onnx_path) != expected:
        raise RetrainError(
            f"{name}/{mv.version}: the downloaded ONNX file does not match the "
            "SHA-256 recorded at registration; refusing to compare against it"
        )
    meta = read_metadata(onnx_path)
    dataset_version = mv.tags.get(TAG_DATASET_VERSION) or str(meta.get("dataset_version", ""))
    if not dataset_version:
        raise RetrainError(
            f"{name}/{mv.version} names no dataset version "
            f"(tag {TAG_DATASET_VERSION}); cannot tell what it was trained on"
        )
    return Champion(name, str(mv.version), mv.run_id, dataset_version, onnx_path, meta)


def _local_path(source: str) -> Path | None:
    try:
        uri = json.loads(source).get("uri", "")
    except (ValueError, AttributeError):
        return None
    parts = urlsplit(uri)
    return Path(unquote(parts.path)) if parts.scheme == "file" else None


def find_dataset(client: MlflowClient, champion: Champion, experiment_ids: list[str]) -> Path:
    """The folder of the champion's dataset version, from the MLflow dataset inputs of its runs.

    The run that registered it comes first; then any run that logged the same version. A folder
    counts only if it still holds exactly that version.
    """
    wanted = champion.dataset_version
    runs = [client.get_run(champion.run_id)] if champion.run_id else []
    runs += client.search_runs(experiment_ids, f"tags.`{TAG_DATASET_VERSION}` = '{wanted}'", max_results=50)
    seen: set[Path] = set()
    for run in runs:
        for di in run.inputs.dataset_inputs if run.inputs else []:
            tags = {t.key: t.value for t in di.tags}
            path = _local_path(di.dataset.source)
            if tags.get(TAG_DATASET_VERSION) != wanted or path is None or path in seen:
                continue
            seen.add(path)
            try:
                if load_dataset(path).version == wanted:
                    return path
            except DatasetError:
                continue
    where = ", ".join(str(p) for p in sorted(seen)) or "no run logged it as an MLflow dataset input"
    raise RetrainError(
        f"cannot find dataset version {wanted[:12]} (what {champion.name}/{champion.version} "
        f"was trained on): {where}; pass its folder as base_data"
    )


def labelled_reviews(settings: Settings) -> tuple[list[LabelledImage], dict[str, int]]:
    """Every labelled review item as a training image; ``unsure`` and unstored ones left out."""
    skipped: dict[str, int] = {}
    images: list[LabelledImage] = []
    query = (
        select(ReviewItem, Prediction.part_id)
        .outerjoin(Prediction, ReviewItem.prediction_id == Prediction.id)
        .where(ReviewItem.status == "labelled")
        .order_by(ReviewItem.id)
    )
    with open_store(settings)() as session:
        for item, part_id in session.execute(query):
            label = (item.label or "").strip()
            if not label or label == UNSURE:
                skipped["unsure"] = skipped.get("unsure", 0) + 1
                continue
            if not item.image_path:
                skipped["image_not_stored"] = skipped.get("image_not_stored", 0) + 1
                continue
            images.append(
                LabelledImage(
                    Path(item.image_path), label, int(item.id), part_id, item.line_id, item.camera_id
                )
            )
    return images, skipped
