"""A new dataset version: a previous version plus the images people labelled in the review queue.

The previous version's images keep their splits (its test set stays the yardstick a retrained
model is compared on); reviewed images get splits the usual way (grouped by part, stratified by
label), so some of them are held out to measure the new model on what the line looks like now.
The new folder links (or copies) the previous images, so nothing is moved or rewritten, and it
is named by its inputs: the same base and the same labels give the same folder and version.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kensa.models.data.discover import MANIFEST_NAME
from kensa.models.data.ingest import (
    DATASET_FILE,
    DatasetVersion,
    ImageRecord,
    Progress,
    ingest_dataset,
    load_dataset,
)
from kensa.models.data.validate import DatasetError
from kensa.settings import Settings

ORIGIN = "origin"  # manifest column: "base" or "review"
REVIEW_ID = "review_id"  # manifest column: the review item a reviewed image came from


@dataclass(frozen=True)
class LabelledImage:
    """One image with the label a person gave it in the review queue."""

    path: Path
    label: str
    review_id: int
    part_id: str | None = None
    line: str | None = None
    camera: str | None = None


@dataclass(frozen=True)
class MergeResult:
    """The new version, the records of the images the review queue added, and what was left out."""

    dataset: DatasetVersion
    added: tuple[ImageRecord, ...]
    skipped: dict[str, int] = field(default_factory=dict)

    def reviewed(self, split: str) -> list[ImageRecord]:
        return [r for r in self.added if r.split == split]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def select_new(
    base: DatasetVersion, images: Sequence[LabelledImage]
) -> tuple[list[tuple[LabelledImage, str]], dict[str, int]]:
    """The labelled images worth adding, with their content hashes, and why others were not.

    Left out: files that are gone, labels the base does not know, images already in the base.
    The same image labelled twice keeps its latest label (the highest review id).
    """
    skipped: Counter[str] = Counter()
    known = {r.sha256 for r in base.records}
    latest: dict[str, tuple[LabelledImage, str]] = {}
    for image in sorted(images, key=lambda i: i.review_id):
        if image.label not in base.classes:
            skipped["label_not_a_class"] += 1
            continue
        if not image.path.is_file():
            skipped["image_missing"] += 1
            continue
        sha = _sha256(image.path)
        if sha in known:
            skipped["already_in_base"] += 1
            continue
        if sha in latest:
            skipped["relabelled_duplicate"] += 1
        latest[sha] = (image, sha)
    chosen = sorted(latest.values(), key=lambda pair: pair[0].review_id)
    return chosen, dict(skipped)


def version_folder(base: DatasetVersion, chosen: Sequence[tuple[LabelledImage, str]]) -> str:
    """Folder name of the merged version: a digest of the base version and the added labels."""
    digest = hashlib.sha256(base.version.encode())
    for image, sha in sorted(chosen, key=lambda pair: pair[1]):
        digest.update(f"{sha}\t{image.label}\n".encode())
    return f"retrain-{digest.hexdigest()[:12]}"


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # same file system: no copy, and the bytes cannot drift
    except OSError:
        shutil.copy2(src, dst)


def merge_reviewed(
    base: DatasetVersion,
    images: Sequence[LabelledImage],
    datasets_dir: Path,
    settings: Settings,
    progress: Progress | None = None,
) -> MergeResult:
    """Write and ingest ``datasets_dir/retrain-<digest>``: ``base`` plus the new labelled images.

    ``settings`` only supplies what ingestion needs besides the dataset rules, which come from
    the base version so the classes and split fractions stay those the champion was trained with.
    """
    chosen, skipped = select_new(base, images)
    root = (datasets_dir / version_folder(base, chosen)).resolve()
    if (root / DATASET_FILE).is_file():  # made before from the same inputs
        ds = load_dataset(root)
        return MergeResult(ds, _added(ds), skipped)
    if root.exists():  # a build that stopped half-way: the dataset file is written last
        shutil.rmtree(root)
    meta_keys = sorted({k for r in base.records for k in r.metadata} - {ORIGIN, REVIEW_ID})
    header = ["path", "label", "split", "part_id", "line", "camera", ORIGIN, REVIEW_ID, *meta_keys]
    rows: list[list[object]] = []
    for r in base.records:
        _link(r.absolute_path, root / "base" / r.path)
        origin = r.metadata.get(ORIGIN, "base")
        rows.append(
            [
                f"base/{r.path}",
                r.label,
                r.split,
                r.part_id,
                r.line,
                r.camera,
                origin,
                r.metadata.get(REVIEW_ID),
                *(r.metadata.get(k) for k in meta_keys),
            ]
        )
    for image, sha in chosen:
        rel = f"reviewed/{image.label}/{sha[:20]}{image.path.suffix.lower()}"
        _link(image.path, root / rel)
        # No split: the splitter places reviewed parts, grouped by part id, like any new data.
        rows.append(
            [
                rel,
                image.label,
                "",
                image.part_id,
                image.line,
                image.camera,
                "review",
                image.review_id,
                *([None] * len(meta_keys)),
            ]
        )
    with (root / MANIFEST_NAME).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
    rules = base.settings
    ingest_settings = settings.model_copy(
        update={
            "classes": rules.classes,
            "min_images_per_class": rules.min_images_per_class,
            "split_fractions": rules.split_fractions,
            "split_seed": rules.split_seed,
        }
    )
    try:
        ds = ingest_dataset(root, ingest_settings, manifest=root / MANIFEST_NAME, progress=progress)
    except DatasetError:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return MergeResult(ds, _added(ds), skipped)


def _added(ds: DatasetVersion) -> tuple[ImageRecord, ...]:
    """Records this merge added (earlier merges' reviewed images sit under ``base/``)."""
    return tuple(r for r in ds.records if r.path.startswith("reviewed/"))
