"""A user's own images as a versioned kensa dataset: ingest, validate, split, card, load."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from kensa.models.data.discover import DATASET_FILE, MANIFEST_NAME, discover_imagefolder, discover_manifest
from kensa.models.data.splits import SplitItem, anomaly_splits, assign_splits, check_split_coverage
from kensa.models.data.validate import (
    SPLITS,
    DatasetError,
    Entry,
    ImageInfo,
    Problem,
    check_class_counts,
    check_duplicates,
    check_labels,
    check_part_leaks,
    inspect_image,
)
from kensa.settings import Settings

__all__ = [
    "DATASET_FILE",
    "SPLITS",
    "DatasetCard",
    "DatasetError",
    "DatasetSettings",
    "DatasetVersion",
    "ImageRecord",
    "Problem",
    "build_card",
    "compute_version",
    "ingest_dataset",
    "load_dataset",
    "write_dataset",
]

# Bumped when the layout of .kensa-dataset.json changes incompatibly.
FILE_FORMAT = 1

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ImageRecord:
    """One validated image of a dataset version; ``path`` is POSIX and relative to ``root``."""

    path: str
    sha256: str
    label: str
    split: str
    part_id: str | None
    line: str | None
    camera: str | None
    width: int
    height: int
    format: str
    metadata: dict[str, str] = field(default_factory=dict)
    root: Path = field(default=Path("."), compare=False, repr=False)

    @property
    def absolute_path(self) -> Path:
        return self.root / self.path

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "root"}

    @classmethod
    def from_json(cls, data: dict[str, Any], root: Path) -> ImageRecord:
        names = {f.name for f in fields(cls)} - {"root"}
        missing = names - set(data)
        if missing:
            msg = f"record {data.get('path')!r} lacks {', '.join(sorted(missing))}"
            raise ValueError(msg)
        return cls(**{k: data[k] for k in names}, root=root)


@dataclass(frozen=True)
class DatasetSettings:
    """The dataset rules a version was made with, so it can be reproduced."""

    classes: tuple[str, ...]
    min_images_per_class: int
    split_fractions: tuple[float, float, float]
    split_seed: int

    @classmethod
    def from_settings(cls, settings: Settings) -> DatasetSettings:
        return cls(
            tuple(settings.classes),
            settings.min_images_per_class,
            settings.split_fractions,
            settings.split_seed,
        )


# A breakdown table: row value (a class, a line, ...) -> column (a split or a class) -> count.
Table = dict[str, dict[str, int]]


@dataclass(frozen=True)
class DatasetCard:
    """What a dataset holds, at a glance; per-line/camera/variant tables are empty if unknown."""

    total: int
    classes: tuple[str, ...]
    by_class_split: Table
    by_line: Table
    by_camera: Table
    by_variant: Table
    image_sizes: dict[str, int]
    formats: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def build_card(records: Sequence[ImageRecord], classes: Sequence[str]) -> DatasetCard:
    """Count images per class × split, per line/camera/variant × class, and sizes seen."""

    def by(key: Callable[[ImageRecord], str | None]) -> Table:
        table: dict[str, Counter[str]] = defaultdict(Counter)
        for r in records:
            value = key(r)
            if value:
                table[value][r.label] += 1
        # Only worth a table when at least one image says it; "unknown" rows cover the rest.
        if table:
            for r in records:
                if not key(r):
                    table["unknown"][r.label] += 1
        return {k: dict(table[k]) for k in sorted(table)}

    by_class_split: Table = {c: {s: 0 for s in SPLITS} for c in classes}
    for r in records:
        by_class_split.setdefault(r.label, {s: 0 for s in SPLITS})[r.split] += 1
    sizes = Counter(f"{r.width}x{r.height}" for r in records)
    return DatasetCard(
        total=len(records),
        classes=tuple(classes),
        by_class_split=by_class_split,
        by_line=by(lambda r: r.line),
        by_camera=by(lambda r: r.camera),
        by_variant=by(lambda r: r.metadata.get("variant")),
        image_sizes=dict(sizes.most_common()),
        formats=dict(Counter(r.format for r in records).most_common()),
    )


def compute_version(triples: Iterable[tuple[str, str, str]]) -> str:
    """sha256 over sorted (content hash, label, split): independent of paths and file order."""
    digest = hashlib.sha256()
    for sha, label, split in sorted(triples):
        digest.update(f"{sha}\t{label}\t{split}\n".encode())
    return digest.hexdigest()


TASKS = ("auto", "classify", "anomaly")


@dataclass(frozen=True)
class DatasetVersion:
    """An ingested dataset: its records, classes (``ok`` first) and content version."""

    root: Path
    version: str
    classes: tuple[str, ...]
    created_at: str
    settings: DatasetSettings
    records: tuple[ImageRecord, ...]
    source: str = "imagefolder"
    notes: tuple[Problem, ...] = ()
    # "classify": every class learned from labelled parts; "anomaly": learned from ok parts only
    # (defective parts, if any, only calibrate and test).
    task: str = "classify"

    @property
    def short_version(self) -> str:
        return self.version[:12]

    @property
    def class_index(self) -> dict[str, int]:
        """Label -> integer class index, the order a model's outputs follow."""
        return {c: i for i, c in enumerate(self.classes)}

    def split(self, name: str) -> list[ImageRecord]:
        if name not in SPLITS:
            msg = f"unknown split {name!r}; splits are {', '.join(SPLITS)}"
            raise ValueError(msg)
        return [r for r in self.records if r.split == name]

    @cached_property
    def card(self) -> DatasetCard:
        return build_card(self.records, self.classes)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FILE_FORMAT,
            "version": self.version,
            "classes": list(self.classes),
            "created_at": self.created_at,
            "source": self.source,
            "task": self.task,
            "settings": asdict(self.settings),
            # The card is derived from the records; stored for people reading the file.
            "card": self.card.to_json(),
            "notes": [asdict(p) for p in self.notes],
            "records": [r.to_json() for r in self.records],
        }


def _discover(root: Path, manifest: Path | None) -> tuple[list[Entry], list[Problem], list[str], str]:
    if manifest is None and (root / MANIFEST_NAME).is_file():
        manifest = root / MANIFEST_NAME
    found = discover_manifest(root, manifest) if manifest else discover_imagefolder(root)
    return found.entries, found.problems, found.folders, found.source


def ingest_dataset(
    root: Path,
    settings: Settings,
    manifest: Path | None = None,
    progress: Progress | None = None,
    write: bool = True,
    task: str = "auto",
) -> DatasetVersion:
    """Validate, split and version the images under ``root``; write ``root/.kensa-dataset.json``.

    Raises DatasetError with every problem found when the data is invalid; then nothing is
    written. ``progress(done, total)`` is called as files are hashed and decoded.

    ``task`` is ``classify`` (ok and defect classes, each in every split), ``anomaly`` (learn from
    ok parts only: defective parts are optional and go to calibration and test, never to
    training) or ``auto``: ``anomaly`` when every labelled part is ok, else ``classify``.
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {', '.join(TASKS)}")
    root = root.resolve()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DatasetError([Problem("missing", f"dataset folder {what}", str(root))])
    rules = DatasetSettings.from_settings(settings)
    entries, problems, folders, source = _discover(root, manifest)
    if any(p.code in ("missing_column", "bad_manifest") for p in problems):
        raise DatasetError(problems)  # no rows to check without the required columns
    if "classes" not in settings.model_fields_set:
        # Not told which labels to accept (no KENSA_CLASSES, no --classes): the data says.
        rules = replace(rules, classes=classes_found((e.label for e in entries), rules.classes))
    classes = rules.classes

    checked: list[tuple[Entry, ImageInfo]] = []
    for done, entry in enumerate(entries, start=1):
        result = inspect_image(root / entry.path, entry.path)
        if isinstance(result, Problem):
            problems.append(result)
        else:
            checked.append((entry, result))
        if progress is not None:
            progress(done, len(entries))

    labelled = [(e, i) for e, i in checked if e.label in classes]
    if task == "auto":
        task = "anomaly" if labelled and all(e.label == "ok" for e, _ in labelled) else "classify"
    problems += check_labels(entries, classes)
    problems += check_duplicates(checked)
    problems += check_part_leaks(entries)
    labels = [e.label for e, _ in labelled]
    if task == "anomaly":
        problems += check_good_parts(labels, rules.min_images_per_class)
    else:
        problems += check_class_counts(
            labels, classes, rules.min_images_per_class, [f for f in folders if f in classes]
        )

    items = [SplitItem(e.path, e.label, i.sha256, e.part_id, e.split) for e, i in labelled]
    splits = assign_splits(items, rules.split_fractions, rules.split_seed)
    # Classes already reported as too small would trivially miss splits; don't repeat them.
    counts = Counter(item.label for item in items)
    big_enough = {label for label, n in counts.items() if n >= rules.min_images_per_class}
    if task == "anomaly":
        splits = anomaly_splits(items, splits)
        big_enough &= {"ok"}  # defective parts are evaluation data: any split but training
    problems += check_split_coverage(items, splits, big_enough)

    if any(p.severity == "error" for p in problems):
        raise DatasetError(problems)

    records = tuple(
        ImageRecord(
            path=e.path,
            sha256=i.sha256,
            label=e.label,
            split=split,
            part_id=e.part_id,
            line=e.line,
            camera=e.camera,
            width=i.width,
            height=i.height,
            format=i.format,
            metadata=e.metadata,
            root=root,
        )
        for (e, i), split in sorted(zip(labelled, splits, strict=True), key=lambda t: t[0][0].path)
    )
    present = {r.label for r in records}
    dataset = DatasetVersion(
        root=root,
        version=compute_version((r.sha256, r.label, r.split) for r in records),
        classes=tuple(c for c in classes if c in present),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        settings=rules,
        records=records,
        source=source,
        notes=tuple(problems),
        task=task,
    )
    if write:
        write_dataset(dataset)
    return dataset


def check_good_parts(labels: Sequence[str], min_images: int) -> list[Problem]:
    """An anomaly dataset needs good parts, enough of them; defective ones are optional."""
    n_ok = sum(label == "ok" for label in labels)
    if n_ok >= min_images:
        return []
    return [
        Problem(
            "too_few_images",
            f"a dataset learned from good parts needs at least {min_images} 'ok' images "
            f"(KENSA_MIN_IMAGES_PER_CLASS); found {n_ok}",
            "ok/",
        )
    ]


def classes_found(labels: Iterable[str], defaults: Sequence[str]) -> tuple[str, ...]:
    """The classes of a folder nobody described: ``ok`` first, then the default classes that occur
    (in their usual order, so the synthetic line keeps its class indices), then new labels sorted.
    """
    found = set(labels)
    known = [c for c in defaults if c in found and c != "ok"]
    return ("ok", *known, *sorted(found - set(known) - {"ok"}))


def write_dataset(dataset: DatasetVersion) -> Path:
    """Write ``.kensa-dataset.json`` atomically: readers see the old file or the new, never half."""
    target = dataset.root / DATASET_FILE
    text = json.dumps(dataset.to_json(), indent=1, ensure_ascii=False)
    fd, tmp = tempfile.mkstemp(dir=dataset.root, prefix=f"{DATASET_FILE}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return target


def _bad_file(path: Path, why: str) -> DatasetError:
    return DatasetError(
        [Problem("bad_dataset_file", f"{why}; run `kensa data ingest {path.parent}` again", str(path))]
    )


def load_dataset(root: Path, verify: bool = False) -> DatasetVersion:
    """Read the dataset version written by ``kensa data ingest``.

    With ``verify``, every file is re-hashed and a DatasetError lists the ones that changed or
    disappeared since ingestion.
    """
    root = root.resolve()
    path = root / DATASET_FILE
    if not path.is_file():
        raise DatasetError(
            [
                Problem(
                    "not_ingested",
                    f"no {DATASET_FILE} here: run `kensa data ingest {root}` first",
                    str(root),
                )
            ]
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FILE_FORMAT:
            raise _bad_file(path, f"unsupported file format {data.get('format')!r}")
        s = data["settings"]
        rules = DatasetSettings(
            tuple(s["classes"]),
            int(s["min_images_per_class"]),
            (
                float(s["split_fractions"][0]),
                float(s["split_fractions"][1]),
                float(s["split_fractions"][2]),
            ),
            int(s["split_seed"]),
        )
        records = tuple(ImageRecord.from_json(r, root) for r in data["records"])
        notes = tuple(Problem(**n) for n in data.get("notes", []))
        dataset = DatasetVersion(
            root=root,
            version=data["version"],
            classes=tuple(data["classes"]),
            created_at=data["created_at"],
            settings=rules,
            records=records,
            source=data.get("source", "imagefolder"),
            notes=notes,
            task=data.get("task", "classify"),
        )
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise _bad_file(path, f"cannot be read ({exc!r})") from exc
    # Guards against hand edits: the version must still describe the records it sits with.
    if compute_version((r.sha256, r.label, r.split) for r in records) != dataset.version:
        raise _bad_file(path, "records do not match the recorded version (edited by hand?)")
    if verify:
        _verify_files(dataset)
    return dataset


def _verify_files(dataset: DatasetVersion) -> None:
    problems = []
    for r in dataset.records:
        try:
            sha = hashlib.sha256(r.absolute_path.read_bytes()).hexdigest()
        except OSError as exc:
            problems.append(Problem("missing", f"cannot be read ({exc.strerror or exc})", r.path))
            continue
        if sha != r.sha256:
            problems.append(Problem("changed", "content changed since ingestion; ingest again", r.path))
    if problems:
        raise DatasetError(problems)
