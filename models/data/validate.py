"""Dataset validation: per-file image checks and cross-file checks, collected into one report."""

from __future__ import annotations

import hashlib
import io
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image, UnidentifiedImageError

Severity = Literal["error", "warning", "note"]

SPLITS: tuple[str, ...] = ("train", "calibration", "test")

# Pillow format names we accept; everything else (GIF, TIFF, WebP, ...) is refused so that
# training, serving and the camera agree on a small set of lossless-or-JPEG formats.
ACCEPTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "BMP")
ACCEPTED_TEXT = "JPEG, PNG or BMP"

# How many problems of one kind the report spells out before summarising the rest.
_REPORT_LINES_PER_CODE = 10


@dataclass(frozen=True)
class Problem:
    """One thing wrong (or worth knowing) about a dataset, naming the file when there is one."""

    code: str
    message: str
    path: str | None = None
    severity: Severity = "error"

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.severity}: {where}{self.message}"


def format_report(problems: Sequence[Problem]) -> str:
    """Render problems as a readable report: errors first, long runs of one kind summarised."""
    order = {"error": 0, "warning": 1, "note": 2}
    ranked = sorted(problems, key=lambda p: order[p.severity])
    n_errors = sum(p.severity == "error" for p in problems)
    lines = [f"dataset is invalid: {n_errors} error(s)" if n_errors else "dataset report"]
    shown: Counter[str] = Counter()
    hidden: Counter[tuple[str, Severity]] = Counter()
    for problem in ranked:
        if shown[problem.code] < _REPORT_LINES_PER_CODE:
            shown[problem.code] += 1
            lines.append(f"  {problem}")
        else:
            hidden[(problem.code, problem.severity)] += 1
    lines += [f"  {sev}: ... and {n} more '{code}' problem(s)" for (code, sev), n in hidden.items()]
    return "\n".join(lines)


class DatasetError(Exception):
    """A dataset failed validation; ``problems`` holds every problem found, not just the first."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__(format_report(self.problems))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]


@dataclass(frozen=True)
class Entry:
    """An image the dataset claims to have (from a folder or a manifest row), not yet checked.

    ``path`` is POSIX-style and relative to the dataset root; ``split`` is None where the
    manifest leaves it to kensa.
    """

    path: str
    label: str
    split: str | None = None
    part_id: str | None = None
    line: str | None = None
    camera: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageInfo:
    """What reading a file taught us: its content hash and decoded geometry."""

    sha256: str
    format: str
    width: int
    height: int


def inspect_image(path: Path, rel: str) -> ImageInfo | Problem:
    """Hash and fully decode one file; a Problem names what is wrong with it.

    Detection is by content, not by extension: a text file named ``.jpg`` is refused, and
    ``img.load()`` decodes every pixel so truncated files fail here rather than mid-training.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Problem("missing", "file not found", rel)
    except IsADirectoryError:
        return Problem("unreadable", "is a directory, expected an image file", rel)
    except OSError as exc:
        return Problem("unreadable", f"cannot be read ({exc.strerror or exc})", rel)
    if not data:
        return Problem("empty_file", f"file is empty (0 bytes); expected a {ACCEPTED_TEXT} image", rel)
    fmt = "an image"  # until Pillow has identified the format
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or "unknown"
            if fmt not in ACCEPTED_FORMATS:
                return Problem(
                    "unsupported_format",
                    f"unsupported image format {fmt}; accepted: {ACCEPTED_TEXT}",
                    rel,
                )
            img.load()
            width, height = img.size
    except UnidentifiedImageError:
        return Problem(
            "unsupported_format",
            f"not an image (content not recognised); accepted: {ACCEPTED_TEXT}",
            rel,
        )
    except Image.DecompressionBombError as exc:
        return Problem("corrupt_image", f"refused as a decompression bomb ({exc})", rel)
    except Exception as exc:
        # Pillow signals truncated data with OSError, but malformed headers surface as
        # SyntaxError, ValueError, struct.error and more. Any of them means the file cannot be
        # trusted for training; it becomes one line of the report, not a crash mid-scan.
        return Problem(
            "corrupt_image",
            f"cannot be decoded as {fmt} ({exc}); re-export it as a complete {ACCEPTED_TEXT}",
            rel,
        )
    return ImageInfo(hashlib.sha256(data).hexdigest(), fmt, width, height)


def check_labels(entries: Iterable[Entry], classes: Sequence[str]) -> list[Problem]:
    """One error per unknown label, naming it, its files and the accepted labels."""
    by_label: dict[str, list[str]] = defaultdict(list)
    for entry in entries:
        if entry.label not in classes:
            by_label[entry.label].append(entry.path)
    problems = []
    for label, paths in sorted(by_label.items()):
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        problems.append(
            Problem(
                "unknown_label",
                f"label {label!r} is not a configured class ({len(paths)} image(s): {shown}); "
                f"accepted labels: {', '.join(classes)} (set KENSA_CLASSES or --classes)",
                paths[0],
            )
        )
    return problems


def check_duplicates(checked: Sequence[tuple[Entry, ImageInfo]]) -> list[Problem]:
    """Exact duplicates by content: a warning, an error if labels disagree or splits differ."""
    by_hash: dict[str, list[Entry]] = defaultdict(list)
    for entry, info in checked:
        by_hash[info.sha256].append(entry)
    problems = []
    for sha, group in by_hash.items():
        if len(group) < 2:
            continue
        first, *others = sorted(group, key=lambda e: e.path)
        for other in others:
            labels = {first.label, other.label}
            splits = {first.split, other.split} - {None}
            if len(labels) > 1:
                problems.append(
                    Problem(
                        "conflicting_duplicate",
                        f"same content as {first.path} but labelled {other.label!r} there "
                        f"{first.label!r}; one image needs one label",
                        other.path,
                    )
                )
            elif len(splits) > 1:
                problems.append(
                    Problem(
                        "split_leak",
                        f"same content as {first.path} but in split {other.split!r} vs "
                        f"{first.split!r}; identical images in two splits leak test data "
                        "into training",
                        other.path,
                    )
                )
            else:
                problems.append(
                    Problem(
                        "duplicate",
                        f"exact duplicate of {first.path} (sha256 {sha[:12]}); kept together in one split",
                        other.path,
                        "warning",
                    )
                )
    return problems


def check_part_leaks(entries: Iterable[Entry]) -> list[Problem]:
    """The same part id in two manifest-given splits is a leak: one part, one split."""
    splits_of: dict[str, dict[str, str]] = defaultdict(dict)
    for entry in entries:
        if entry.part_id is not None and entry.split is not None:
            splits_of[entry.part_id].setdefault(entry.split, entry.path)
    problems = []
    for part_id, where in sorted(splits_of.items()):
        if len(where) > 1:
            detail = ", ".join(f"{split} ({path})" for split, path in sorted(where.items()))
            problems.append(
                Problem(
                    "part_leak",
                    f"part id {part_id!r} appears in several splits: {detail}; all images of "
                    "one part must be in one split",
                    min(where.values()),
                )
            )
    return problems


def check_class_counts(
    labels: Sequence[str], classes: Sequence[str], min_images: int, folders: Iterable[str] = ()
) -> list[Problem]:
    """Enough images per class, images at all, and ``ok`` plus at least one defect class.

    ``folders`` are class folders the user made explicitly; an empty one counts as a class with
    zero images rather than as absent, because the user clearly meant it to hold images.
    """
    counts = Counter(label for label in labels if label in classes)
    for folder in folders:
        counts.setdefault(folder, 0)
    if not labels:
        return [
            Problem(
                "no_images",
                f"no images found; expected class folders ({', '.join(classes)}) holding "
                f"{ACCEPTED_TEXT} files, or a manifest.csv with columns path,label",
            )
        ]
    problems = [
        Problem(
            "too_few_images",
            f"class {label!r} has {n} valid image(s); at least {min_images} are needed "
            "(KENSA_MIN_IMAGES_PER_CLASS)",
            f"{label}/",
        )
        for label, n in sorted(counts.items())
        if n < min_images
    ]
    present = sorted(label for label, n in counts.items() if n > 0)
    if "ok" not in present or len(present) < 2:
        problems.append(
            Problem(
                "one_class",
                f"found class(es): {', '.join(present) or 'none'}; a dataset needs 'ok' and at "
                f"least one defect class with images (configured: {', '.join(classes)})",
            )
        )
    return problems
