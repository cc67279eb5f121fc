"""Find a dataset's images: an ImageFolder tree (class = folder name) or a CSV manifest."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from kensa.models.data.validate import SPLITS, Entry, Problem

MANIFEST_NAME = "manifest.csv"
DATASET_FILE = ".kensa-dataset.json"

REQUIRED_COLUMNS: tuple[str, ...] = ("path", "label")
# Columns with a fixed meaning; every other column is kept as per-image metadata.
KNOWN_COLUMNS: tuple[str, ...] = (*REQUIRED_COLUMNS, "split", "part_id", "line", "camera")

# Extensions that make a stray file look like an image worth a note when a manifest skips it.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
# OS clutter that lands in image folders and is never meant as data.
_JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini"})


@dataclass
class Discovery:
    """What a source claims the dataset holds, plus problems found while reading it."""

    entries: list[Entry]
    problems: list[Problem] = field(default_factory=list)
    # Class folders the user made (ImageFolder only), so empty ones are reported.
    folders: list[str] = field(default_factory=list)
    source: str = "imagefolder"


def _visible_files(folder: Path) -> Iterator[Path]:
    """Files under ``folder``, sorted, skipping hidden files/folders and OS clutter."""
    for path in sorted(folder.rglob("*")):
        rel_parts = path.relative_to(folder).parts
        if any(part.startswith(".") for part in rel_parts):
            continue
        if path.is_file() and path.name.lower() not in _JUNK_NAMES:
            yield path


def discover_imagefolder(root: Path) -> Discovery:
    """Every visible file under a top-level folder is an image of the class named by the folder.

    Files are not filtered by extension: a stray ``notes.txt`` in a class folder is reported as
    an unsupported file rather than silently skipped, so nothing the user meant as data is lost.
    """
    found = Discovery(entries=[])
    for child in sorted(root.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            found.folders.append(child.name)
            for path in _visible_files(child):
                rel = path.relative_to(root).as_posix()
                found.entries.append(Entry(path=rel, label=child.name))
        elif child.suffix.lower() in IMAGE_SUFFIXES:
            found.problems.append(
                Problem(
                    "ignored_file",
                    "ignored: images must sit in a class folder (e.g. ok/, defect_<type>/)",
                    child.name,
                    "note",
                )
            )
    return found


def _normalise_manifest_path(raw: str) -> str | None:
    """A manifest path as a clean POSIX path relative to the root; None if it escapes the root."""
    # Manifests written on Windows use backslashes; treat them as separators.
    text = raw.strip().replace("\\", "/")
    pure = PurePosixPath(text)
    if pure.is_absolute() or (len(text) > 1 and text[1] == ":"):
        return None
    parts: list[str] = []
    for part in pure.parts:
        if part == "..":
            if not parts:
                return None
            parts.pop()
        elif part != ".":
            parts.append(part)
    return "/".join(parts) if parts else None


def _optional(row: dict[str, str | None], column: str) -> str | None:
    value = (row.get(column) or "").strip()
    return value or None


def discover_manifest(root: Path, manifest: Path) -> Discovery:
    """Read a CSV manifest (``path,label`` required); paths are relative to ``root``."""
    name = manifest.name
    found = Discovery(entries=[], source=f"manifest:{manifest}")
    try:
        # utf-8-sig: spreadsheet tools often prepend a byte-order mark to CSV exports.
        with manifest.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                found.problems.append(
                    Problem(
                        "missing_column",
                        f"manifest has no column {', '.join(repr(c) for c in missing)}; required "
                        f"columns: {', '.join(REQUIRED_COLUMNS)}; optional: split, part_id, line, "
                        f"camera (found: {', '.join(header) or 'no header'})",
                        name,
                    )
                )
                return found
            reader.fieldnames = header
            rows = list(reader)
    except FileNotFoundError:
        found.problems.append(Problem("bad_manifest", "manifest file not found", str(manifest)))
        return found
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        found.problems.append(Problem("bad_manifest", f"manifest cannot be read as UTF-8 CSV ({exc})", name))
        return found

    first_row: dict[str, int] = {}
    # Row 1 is the header, so data rows count from 2 as in a spreadsheet.
    for number, row in enumerate(rows, start=2):
        where = f"{name} row {number}"
        raw_path = (row.get("path") or "").strip()
        label = (row.get("label") or "").strip()
        if not raw_path or not label:
            found.problems.append(Problem("empty_field", "row has an empty 'path' or 'label'", where))
            continue
        rel = _normalise_manifest_path(raw_path)
        if rel is None:
            found.problems.append(
                Problem(
                    "path_outside_root",
                    f"path {raw_path!r} is absolute or leaves the dataset root; manifest paths "
                    f"must be relative to {root}",
                    where,
                )
            )
            continue
        if rel in first_row:
            found.problems.append(
                Problem("duplicate_row", f"listed twice (rows {first_row[rel]} and {number})", rel)
            )
            continue
        first_row[rel] = number
        split = _optional(row, "split")
        if split is not None:
            split = split.lower()
            if split not in SPLITS:
                found.problems.append(
                    Problem(
                        "unknown_split",
                        f"split {split!r} is not one of {', '.join(SPLITS)} (or empty to let kensa choose)",
                        rel,
                    )
                )
                continue
        # Key None holds surplus cells of an over-long row; they have no column name to keep.
        metadata = {k: str(v or "").strip() for k, v in row.items() if k and k not in KNOWN_COLUMNS}
        found.entries.append(
            Entry(
                path=rel,
                label=label,
                split=split,
                part_id=_optional(row, "part_id"),
                line=_optional(row, "line"),
                camera=_optional(row, "camera"),
                metadata=metadata,
            )
        )

    listed = set(first_row)
    for path in _visible_files(root):
        rel = path.relative_to(root).as_posix()
        if path.suffix.lower() in IMAGE_SUFFIXES and rel not in listed:
            found.problems.append(
                Problem("not_in_manifest", "ignored: image file not listed in the manifest", rel, "note")
            )
    return found
