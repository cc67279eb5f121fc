"""Ingesting a user's own images: validation report, grouped stratified splits, versions, load."""

from __future__ import annotations

import csv
import json
import random
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner, Result

from kensa.cli.common import get_settings
from kensa.models.data.ingest import (
    DATASET_FILE,
    SPLITS,
    DatasetError,
    ingest_dataset,
    load_dataset,
)
from kensa.settings import Settings

CLASSES = ("ok", "defect_scratch", "defect_dent")
_counter = iter(range(10**9))


def write_image(path: Path, fmt: str = "PNG", size: tuple[int, int] = (16, 12)) -> Path:
    """A small noise image; every call gives different content (so no accidental duplicates)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(next(_counter))
    Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3)).save(path, format=fmt)
    return path


def make_imagefolder(root: Path, counts: dict[str, int]) -> Path:
    for label, n in counts.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            write_image(root / label / f"{label}_{i:03d}.png")
    return root


def write_manifest(path: Path, rows: list[dict[str, str]], columns: list[str] | None = None) -> Path:
    columns = columns or list(rows[0])
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_parts_dataset(root: Path, parts: dict[str, int], per_part: int = 2) -> list[dict[str, str]]:
    """Manifest rows for ``parts[label]`` parts per label, ``per_part`` images (cameras) each."""
    rows = []
    for label, n_parts in parts.items():
        for p in range(n_parts):
            for cam in range(per_part):
                rel = f"{label}/{label}_p{p:02d}_c{cam}.png"
                write_image(root / rel)
                rows.append(
                    {
                        "path": rel,
                        "label": label,
                        "part_id": f"{label}-{p:02d}",
                        "line": f"L{p % 2}",
                        "camera": f"cam{cam}",
                        "variant": "A" if p % 3 else "B",
                        "lighting": "dim" if cam else "bright",
                    }
                )
    return rows


def settings(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "classes": CLASSES,
        "min_images_per_class": 5,
        "split_fractions": (0.6, 0.2, 0.2),
        "split_seed": 0,
    }
    values.update(overrides)
    return Settings.model_validate(values)


# --- valid data ---------------------------------------------------------------------------------


def test_imagefolder_ingests_with_every_class_in_every_split(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "ds", {"ok": 10, "defect_scratch": 6, "defect_dent": 5})
    dataset = ingest_dataset(root, settings())

    assert len(dataset.version) == 64 and dataset.short_version == dataset.version[:12]
    assert dataset.classes == CLASSES
    assert len(dataset.records) == 21
    for label in CLASSES:
        for split in SPLITS:
            assert any(r.label == label for r in dataset.split(split)), (label, split)
    card = dataset.card
    assert card.total == 21
    assert card.by_class_split["ok"] == {"train": 6, "calibration": 2, "test": 2}
    assert sum(card.by_class_split["defect_dent"].values()) == 5
    assert card.image_sizes == {"16x12": 21}
    assert (root / DATASET_FILE).is_file()
    saved = json.loads((root / DATASET_FILE).read_text())
    assert saved["version"] == dataset.version
    assert {r["path"] for r in saved["records"]} == {r.path for r in dataset.records}


def test_version_is_deterministic_and_tracks_labels_and_bytes(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "ds", {"ok": 6, "defect_scratch": 6, "defect_dent": 6})
    first = ingest_dataset(root, settings())
    assert ingest_dataset(root, settings()).version == first.version
    # Paths do not enter the version: the same content elsewhere is the same dataset.
    copy = Path(shutil.copytree(root, tmp_path / "copy"))
    assert ingest_dataset(copy, settings()).version == first.version

    # Relabel one image: move it from one class folder to another.
    moved = copy / "defect_scratch" / "defect_scratch_000.png"
    moved.rename(copy / "defect_dent" / "moved.png")
    relabelled = ingest_dataset(copy, settings())
    assert relabelled.version != first.version

    # Change a single byte of pixel data (still a valid image).
    target = root / "ok" / "ok_003.png"
    with Image.open(target) as opened:
        img = opened.convert("RGB")
    r, g, b = img.getpixel((0, 0))  # type: ignore[misc]
    img.putpixel((0, 0), ((r + 1) % 256, g, b))
    img.save(target)
    assert ingest_dataset(root, settings()).version not in {first.version, relabelled.version}


def test_splits_group_parts_stratify_labels_and_are_deterministic(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    rows = make_parts_dataset(root, {"ok": 20, "defect_scratch": 10, "defect_dent": 5})
    write_manifest(root / "manifest.csv", rows)
    dataset = ingest_dataset(root, settings())

    split_of_part: dict[str, set[str]] = defaultdict(set)
    for r in dataset.records:
        assert r.part_id is not None
        split_of_part[r.part_id].add(r.split)
    assert all(len(s) == 1 for s in split_of_part.values()), "a part spans two splits"

    counts = dataset.card.by_class_split
    assert counts["ok"] == {"train": 24, "calibration": 8, "test": 8}
    assert counts["defect_scratch"] == {"train": 12, "calibration": 4, "test": 4}
    assert all(counts["defect_dent"][s] >= 2 for s in SPLITS)  # 5 parts of 2 images

    # Same data listed in another order, written to another place: same splits.
    other = Path(shutil.copytree(root, tmp_path / "other"))
    write_manifest(other / "manifest.csv", list(reversed(rows)))
    again = ingest_dataset(other, settings())
    assert [(r.path, r.split) for r in again.records] == [(r.path, r.split) for r in dataset.records]
    assert again.version == dataset.version
    # The seed matters.
    reseeded = ingest_dataset(other, settings(split_seed=1))
    assert [r.split for r in reseeded.records] != [r.split for r in dataset.records]


def test_manifest_splits_are_honoured_and_pull_their_part_along(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    rows = make_parts_dataset(root, {"ok": 10, "defect_scratch": 10})
    # Fix one image of two parts; their sibling images (no split given) must follow.
    rows[0]["split"] = "test"  # ok-00 camera 0
    rows[20]["split"] = "calibration"  # defect_scratch-00 camera 0
    columns = ["path", "label", "split", "part_id", "line", "camera", "variant", "lighting"]
    write_manifest(root / "manifest.csv", rows, columns)
    dataset = ingest_dataset(root, settings())
    by_part = {r.part_id: r.split for r in dataset.records}
    assert by_part["ok-00"] == "test"
    assert by_part["defect_scratch-00"] == "calibration"


def test_manifest_metadata_card_and_unlisted_files(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    rows = make_parts_dataset(root, {"ok": 5, "defect_dent": 5}, per_part=1)
    write_image(root / "ok" / "stray.png")
    write_manifest(root / "manifest.csv", rows)
    dataset = ingest_dataset(root, settings())

    assert dataset.classes == ("ok", "defect_dent")  # only classes that have images
    record = next(r for r in dataset.records if r.path == rows[0]["path"])
    assert record.metadata == {"variant": rows[0]["variant"], "lighting": "bright"}
    assert record.line == "L0" and record.camera == "cam0"
    assert record.absolute_path == (root / rows[0]["path"]).resolve()
    assert "ok/stray.png" not in {r.path for r in dataset.records}
    assert any(n.code == "not_in_manifest" and n.path == "ok/stray.png" for n in dataset.notes)
    card = dataset.card
    assert card.by_line == {"L0": {"ok": 3, "defect_dent": 3}, "L1": {"ok": 2, "defect_dent": 2}}
    assert set(card.by_camera) == {"cam0"}
    assert set(card.by_variant) == {"A", "B"}


def test_duplicates_are_reported_and_kept_in_one_split(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "ds", {"ok": 8, "defect_scratch": 6})
    for i in range(3):
        shutil.copy(root / "ok" / "ok_000.png", root / "ok" / f"copy_{i}.png")
    dataset = ingest_dataset(root, settings())
    original = next(r for r in dataset.records if r.path == "ok/ok_000.png")
    copies = [r for r in dataset.records if r.sha256 == original.sha256]
    assert len(copies) == 4 and len({r.split for r in copies}) == 1
    assert sum(n.code == "duplicate" for n in dataset.notes) == 3


def test_load_dataset_round_trip(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "ds", {"ok": 7, "defect_scratch": 5, "defect_dent": 5})
    written = ingest_dataset(root, settings())
    loaded = load_dataset(root)

    assert loaded.version == written.version
    assert loaded.classes == written.classes
    assert loaded.records == written.records
    assert loaded.card == written.card
    assert loaded.settings == written.settings
    for split in SPLITS:
        assert [r.path for r in loaded.split(split)] == [r.path for r in written.split(split)]
    assert all(r.absolute_path.is_file() for r in loaded.records)
    assert loaded.class_index == {"ok": 0, "defect_scratch": 1, "defect_dent": 2}
    with pytest.raises(ValueError, match="unknown split"):
        loaded.split("validation")

    # verify=True re-hashes: a file changed after ingestion is caught.
    write_image(root / loaded.records[0].path)
    with pytest.raises(DatasetError, match="content changed"):
        load_dataset(root, verify=True)


def test_load_dataset_without_ingest_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="run `kensa data ingest"):
        load_dataset(tmp_path)


# --- the CLI --------------------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Result]]:
    """Run ``kensa data ingest`` in-process with default settings and an isolated data dir."""
    from kensa.cli.main import app

    for name in ("CLASSES", "MIN_IMAGES_PER_CLASS", "SPLIT_FRACTIONS", "SPLIT_SEED"):
        monkeypatch.delenv(f"KENSA_{name}", raising=False)
    monkeypatch.setenv("KENSA_DATA_DIR", str(tmp_path / "kensa-home"))
    get_settings.cache_clear()
    runner = CliRunner()

    def run(*args: str) -> Result:
        return runner.invoke(app, ["data", "ingest", *args])

    yield run
    get_settings.cache_clear()


def test_good_parts_only_ingest_as_an_anomaly_dataset(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "ds", {"ok": 20})
    dataset = ingest_dataset(root, settings())
    assert dataset.task == "anomaly" and dataset.classes == ("ok",)
    assert all(dataset.split(s) for s in SPLITS)
    assert load_dataset(root).task == "anomaly"  # recorded with the version


def test_anomaly_task_keeps_defective_parts_out_of_training(tmp_path: Path) -> None:
    # Two defective images only: too few for a class of a classifier, enough to test with.
    root = make_imagefolder(tmp_path / "ds", {"ok": 20, "defect_scratch": 2, "defect_dent": 4})
    with pytest.raises(DatasetError, match="defect_scratch"):
        ingest_dataset(root, settings(), task="classify")
    dataset = ingest_dataset(root, settings(), task="anomaly")
    assert dataset.task == "anomaly"
    assert {r.label for r in dataset.split("train")} == {"ok"}
    defective = [r for r in dataset.records if r.label != "ok"]
    assert len(defective) == 6 and {r.split for r in defective} == {"calibration", "test"}
    with pytest.raises(DatasetError, match="at least 5 'ok' images"):
        ingest_dataset(
            make_imagefolder(tmp_path / "few", {"ok": 3, "defect_dent": 9}), settings(), task="anomaly"
        )


def test_cli_task_option(tmp_path: Path, cli: Callable[..., Result]) -> None:
    root = make_imagefolder(tmp_path / "ds", {"ok": 12})
    bad = cli(str(root), "--task", "segment")
    assert bad.exit_code == 2 and "auto, classify, anomaly" in bad.stderr
    result = cli(str(root))
    assert result.exit_code == 0 and "task: anomaly" in result.stdout


def test_cli_ingest_prints_version_and_card(tmp_path: Path, cli: Callable[..., Result]) -> None:
    root = make_imagefolder(tmp_path / "ds", {"ok": 6, "defect_scratch": 5})
    result = cli(str(root))
    assert result.exit_code == 0, result.output
    dataset = load_dataset(root)
    assert dataset.short_version in result.stdout
    assert "images per class and split" in result.stdout


def test_cli_classes_option(tmp_path: Path, cli: Callable[..., Result]) -> None:
    root = make_imagefolder(tmp_path / "ds", {"ok": 5, "defect_burr": 5})
    told = cli(str(root), "--classes", "ok,defect_scratch")  # told, so the folder's label is unknown
    assert told.exit_code == 2 and "'defect_burr' is not a configured class" in told.stderr
    result = cli(str(root), "--classes", "ok,defect_burr")
    assert result.exit_code == 0, result.output
    assert load_dataset(root).classes == ("ok", "defect_burr")
    bad = cli(str(root), "--classes", "defect_burr,ok")
    assert bad.exit_code == 2 and "must start with 'ok'" in bad.stderr


def _empty(root: Path) -> list[str]:
    root.mkdir()
    return ["no images found"]


def _one_class(root: Path) -> list[str]:
    make_imagefolder(root, {"defect_scratch": 6})  # ok parts only would be an anomaly dataset
    return ["a dataset needs 'ok' and at least one defect class"]


def _zero_byte(root: Path) -> list[str]:
    make_imagefolder(root, {"ok": 5, "defect_scratch": 5})
    (root / "defect_scratch" / "blank.png").write_bytes(b"")
    return ["defect_scratch/blank.png", "0 bytes"]


def _truncated_jpeg(root: Path) -> list[str]:
    make_imagefolder(root, {"ok": 5, "defect_scratch": 5})
    path = write_image(root / "ok" / "cut.jpg", fmt="JPEG", size=(64, 64))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return ["ok/cut.jpg", "cannot be decoded"]


def _text_named_jpg(root: Path) -> list[str]:
    make_imagefolder(root, {"ok": 5, "defect_scratch": 5})
    (root / "ok" / "notes.jpg").write_text("not a picture\n")
    return ["ok/notes.jpg", "not an image", "accepted: JPEG, PNG or BMP"]


def _unknown_label(root: Path) -> list[str]:
    make_imagefolder(root, {"ok": 5, "defect_scratch": 5, "defect_wobble": 5})
    return ["'defect_wobble'", "defect_wobble/defect_wobble_000.png", "accepted labels: ok,"]


def _leak_between_splits(root: Path) -> list[str]:
    make_imagefolder(root, {"ok": 5, "defect_scratch": 5})
    shutil.copy(root / "ok" / "ok_000.png", root / "ok" / "again.png")
    rows = [
        {"path": p.relative_to(root).as_posix(), "label": p.parent.name, "split": SPLITS[i % 3]}
        for i, p in enumerate(sorted(root.glob("*/*.png")))
    ]
    for row in rows:
        if row["path"] == "ok/again.png":
            row["split"] = "test"
        if row["path"] == "ok/ok_000.png":
            row["split"] = "train"
    write_manifest(root / "manifest.csv", rows)
    return ["ok/again.png", "ok/ok_000.png", "same content as", "two splits leak", "'test'"]


def _missing_column(root: Path) -> list[str]:
    make_imagefolder(root, {"ok": 5, "defect_scratch": 5})
    rows = [{"path": p.relative_to(root).as_posix()} for p in sorted(root.glob("*/*.png"))]
    write_manifest(root / "manifest.csv", rows)
    return ["manifest.csv", "no column 'label'", "required columns: path, label"]


def _outside_root(root: Path) -> list[str]:
    make_imagefolder(root, {"ok": 5, "defect_scratch": 5})
    write_image(root.parent / "elsewhere.png")
    rows = [
        {"path": p.relative_to(root).as_posix(), "label": p.parent.name} for p in sorted(root.glob("*/*.png"))
    ]
    rows.append({"path": "../elsewhere.png", "label": "ok"})
    rows.append({"path": "/etc/hostname", "label": "ok"})
    write_manifest(root / "manifest.csv", rows)
    return ["'../elsewhere.png'", "'/etc/hostname'", "leaves the dataset root", "manifest.csv row"]


BROKEN: dict[str, Callable[[Path], list[str]]] = {
    "empty folder": _empty,
    "one class only": _one_class,
    "zero-byte file": _zero_byte,
    "truncated jpeg": _truncated_jpeg,
    "text file named .jpg": _text_named_jpg,
    "unknown label folder": _unknown_label,
    "same image in train and test": _leak_between_splits,
    "manifest missing a column": _missing_column,
    "path outside the root": _outside_root,
}


# Cases that need the accepted labels spelled out (by default the folder names are the classes).
TOLD: dict[str, list[str]] = {"unknown label folder": ["--classes", "ok,defect_scratch,defect_dent"]}


@pytest.mark.parametrize("case", list(BROKEN))
def test_cli_rejects_broken_data_and_writes_nothing(
    case: str, tmp_path: Path, cli: Callable[..., Result]
) -> None:
    root = tmp_path / "ds"
    expected = BROKEN[case](root)
    result = cli(str(root), *TOLD.get(case, []))
    assert result.exit_code == 2, result.output
    report = result.stderr
    assert report.startswith("dataset is invalid")
    for text in expected:
        assert text in report, f"{text!r} not in report:\n{report}"
    assert not list(root.glob(".kensa-dataset*")), "something was written for invalid data"


def test_a_folder_of_classes_the_settings_do_not_list_ingests(
    tmp_path: Path, cli: Callable[..., Result]
) -> None:
    root = make_imagefolder(tmp_path / "ds", {"ok": 6, "defect_wobble": 6, "defect_scratch": 6, "bent": 6})
    result = cli(str(root))
    assert result.exit_code == 0, result.output
    # ok first, a class the synthetic line knows next, then the new ones in name order.
    assert load_dataset(root).classes == ("ok", "defect_scratch", "bent", "defect_wobble")


def test_report_collects_every_problem_at_once(tmp_path: Path, cli: Callable[..., Result]) -> None:
    root = make_imagefolder(tmp_path / "ds", {"ok": 5, "defect_scratch": 3, "defect_wobble": 1})
    (root / "ok" / "blank.png").write_bytes(b"")
    (root / "ok" / "notes.jpg").write_text("hello")
    result = cli(str(root))
    assert result.exit_code == 2
    report = result.stderr
    for text in ("ok/blank.png", "ok/notes.jpg", "'defect_wobble'", "'defect_scratch' has 3"):
        assert text in report, f"{text!r} not in report:\n{report}"


def test_part_in_two_manifest_splits_is_a_leak(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    rows = make_parts_dataset(root, {"ok": 5, "defect_dent": 5})
    for i, row in enumerate(rows):
        row["split"] = SPLITS[(i // 2) % 3]
    rows[1]["split"] = "test" if rows[0]["split"] != "test" else "train"  # split part ok-00
    write_manifest(root / "manifest.csv", rows)
    with pytest.raises(DatasetError) as info:
        ingest_dataset(root, settings())
    assert [p.code for p in info.value.errors] == ["part_leak"]
    assert "'ok-00'" in str(info.value)
    assert not (root / DATASET_FILE).exists()


def test_class_from_too_few_parts_cannot_fill_every_split(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    rows = make_parts_dataset(root, {"ok": 6, "defect_dent": 2}, per_part=3)
    write_manifest(root / "manifest.csv", rows)
    with pytest.raises(DatasetError) as info:
        ingest_dataset(root, settings())
    errors = info.value.errors
    assert [(p.code, p.path) for p in errors] == [("class_missing_from_split", "defect_dent/")]
    assert "2 part(s)" in str(info.value)
    assert not (root / DATASET_FILE).exists()
