"""The synthetic line: determinism, conditions that move images the right way, datasets, CLI."""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner

from kensa.models.line.synthetic import (
    CLASSES,
    CONDITION_COLUMNS,
    DEFECT_TYPES,
    MANIFEST_COLUMNS,
    LineConditions,
    generate_dataset,
    generate_part,
    iter_parts,
    part_seed,
    read_manifest,
    read_mask,
)

SIZE = 64
SEEDS = (1, 2, 3)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _grey(image: np.ndarray) -> np.ndarray:
    return np.asarray(image, np.float64).mean(axis=2)


def _render(seed: int, label: str = "ok", **overrides: object) -> np.ndarray:
    return generate_part(part_seed(0, seed), LineConditions().with_overrides(overrides), SIZE, label)[0]


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path: Path) -> None:
    a = _files(generate_dataset(tmp_path / "a", 12, seed=5, image_size=SIZE).parent)
    b = _files(generate_dataset(tmp_path / "b", 12, seed=5, image_size=SIZE).parent)
    c = _files(generate_dataset(tmp_path / "c", 12, seed=6, image_size=SIZE).parent)
    assert a == b
    masks = [k for k in a if k.startswith(".masks/")]
    assert len(a) == 12 + len(masks) + 2  # images, a mask per defective part, manifest, marker
    assert len(masks) == sum(",defect_" in line for line in a["manifest.csv"].decode().splitlines())
    assert a["manifest.csv"] != c["manifest.csv"]
    pngs_a = sorted(v for k, v in a.items() if k.endswith(".png") and not k.startswith(".masks/"))
    pngs_c = sorted(v for k, v in c.items() if k.endswith(".png") and not k.startswith(".masks/"))
    assert not set(pngs_a) & set(pngs_c)


def test_part_k_does_not_depend_on_where_the_stream_starts() -> None:
    cond = LineConditions()
    from_zero = list(iter_parts(4, 9, cond, SIZE))
    ((image, record),) = iter_parts(1, 9, cond, SIZE, start=3)
    assert np.array_equal(image, from_zero[3][0])
    assert record == from_zero[3][1]
    assert record.part_id == "L1-9-000003"
    assert len({r.part_id for _, r in from_zero}) == 4


def test_image_shape_and_type() -> None:
    image, record = generate_part(7, LineConditions(), SIZE)
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    assert record.label in CLASSES and record.variant in {"A", "B", "C"}
    assert set(record.conditions) == set(CONDITION_COLUMNS)


@pytest.mark.parametrize("seed", SEEDS)
def test_lower_lighting_darkens(seed: int) -> None:
    assert _grey(_render(seed, lighting=0.6)).mean() < 0.75 * _grey(_render(seed)).mean()


@pytest.mark.parametrize("seed", SEEDS)
def test_focus_blur_lowers_sharpness(seed: int) -> None:
    def sharpness(img: np.ndarray) -> float:
        return float(ndimage.laplace(_grey(img)).var())

    assert sharpness(_render(seed, focus_blur=3)) < 0.5 * sharpness(_render(seed, focus_blur=0))


@pytest.mark.parametrize("seed", SEEDS)
def test_noise_raises_high_frequency_energy(seed: int) -> None:
    def high_freq(img: np.ndarray) -> float:  # per channel: sensor noise is independent per channel
        rgb = np.asarray(img, np.float64)
        return float(((rgb - ndimage.gaussian_filter(rgb, (1.5, 1.5, 0))) ** 2).mean())

    assert high_freq(_render(seed, noise=15)) > 1.5 * high_freq(_render(seed, noise=0))


@pytest.mark.parametrize("seed", SEEDS)
def test_lower_color_temperature_is_redder(seed: int) -> None:
    def red_over_blue(img: np.ndarray) -> float:
        mean = img.reshape(-1, 3).astype(np.float64).mean(axis=0)
        return float(mean[0] / mean[2])

    warm, cold = _render(seed, color_temp=3500), _render(seed, color_temp=8000)
    assert red_over_blue(warm) > 1.3 * red_over_blue(cold)


@pytest.mark.parametrize("label", DEFECT_TYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_defect_changes_the_same_part_only_locally(label: str, seed: int) -> None:
    ok, _ = generate_part(part_seed(0, seed), LineConditions(), SIZE, "ok")
    bad, record = generate_part(part_seed(0, seed), LineConditions(), SIZE, label)
    assert record.label == label and record.defect_box is not None
    assert record.defect_severity is not None and 0 <= record.defect_severity <= 1
    diff = np.abs(ok.astype(int) - bad.astype(int)).sum(axis=2)
    assert diff.sum() > 0
    x0, y0, x1, y1 = record.defect_box
    inside = np.zeros_like(diff, dtype=bool)
    inside[max(y0 - 2, 0) : y1 + 2, max(x0 - 2, 0) : x1 + 2] = True  # blur spreads ~2 px
    assert diff[~inside].sum() <= 0.02 * diff.sum()
    assert inside.mean() < 0.4
    # The mask is where the part changed: inside the box, and most changed pixels are in it.
    mask = record.defect_mask
    assert mask is not None and mask.shape == (SIZE, SIZE) and mask.any()
    assert not (mask & ~inside).any()
    if label != "defect_missing_hole":  # a missing hole may look like bare metal: the mask is the hole
        grown = mask.copy()
        for axis, step in ((0, 1), (0, -1), (1, 1), (1, -1)):  # grow by a pixel: the blur spreads it
            grown |= np.roll(mask, step, axis=axis)
        assert diff[grown].sum() >= 0.5 * diff.sum()


def test_manifest_columns_rows_and_files_agree(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    manifest = generate_dataset(out, 20, seed=3, image_size=SIZE)
    assert manifest == out / "manifest.csv"
    with manifest.open(newline="") as fh:
        assert tuple(next(csv.reader(fh))) == MANIFEST_COLUMNS
    rows = read_manifest(manifest)
    assert len(rows) == 20 and len({r["part_id"] for r in rows}) == 20
    on_disk = Counter(p.parent.name for p in out.glob("[!.]*/*.png"))
    assert on_disk == Counter(r["label"] for r in rows)
    for row in rows:
        assert row["path"] == f"{row['label']}/{row['part_id']}.png"
        assert Image.open(out / row["path"]).size == (SIZE, SIZE)
        assert row["camera"] in {"C1", "C2"} and row["line"] == "L1"
        mask = read_mask(out, row)
        if row["label"] == "ok":
            assert row["mask"] == "" and mask is None
        else:  # hidden folder: an ImageFolder loader does not take the masks for a class
            assert row["mask"].startswith(".masks/") and mask is not None and mask.any()
        assert all(float(row[c]) == float(row[c]) for c in CONDITION_COLUMNS)


def test_defect_rate_zero_gives_only_ok_parts(tmp_path: Path) -> None:
    out = tmp_path / "ok_only"
    rows = read_manifest(
        generate_dataset(out, 15, seed=1, image_size=SIZE, conditions=LineConditions(defect_rate=0.0))
    )
    assert {r["label"] for r in rows} == {"ok"}
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["ok"]


def test_defect_mix_limits_defect_types() -> None:
    cond = LineConditions().with_overrides(["defect_rate=1", "defect_mix=scratch:1,crack:1"])
    labels = {r.label for _, r in iter_parts(20, 0, cond, 32)}
    assert labels == {"defect_scratch", "defect_crack"}


def test_unknown_condition_is_named_with_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown condition 'bogus'.*lighting.*color_temp"):
        LineConditions().with_overrides(["bogus=1"])
    with pytest.raises(ValueError, match="lighting needs a number"):
        LineConditions().with_overrides({"lighting": "bright"})
    with pytest.raises(ValueError, match="glare=2.0 is outside"):
        LineConditions().with_overrides(["glare=2"])
    assert LineConditions().with_overrides({"lighting": 0.6}).lighting == 0.6


def test_refuses_bad_arguments_and_foreign_folders(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        generate_dataset(tmp_path / "x", 0, seed=0, image_size=SIZE)
    with pytest.raises(ValueError, match="32..1024"):
        generate_dataset(tmp_path / "x", 2, seed=0, image_size=16)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a previous"):
        generate_dataset(foreign, 2, seed=0, image_size=SIZE)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_regenerating_replaces_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    generate_dataset(out, 6, seed=0, image_size=SIZE)
    generate_dataset(out, 3, seed=1, image_size=SIZE)
    assert len(read_manifest(out / "manifest.csv")) == 3
    assert len(list(out.glob("[!.]*/*.png"))) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_failure_leaves_no_half_dataset(tmp_path: Path) -> None:
    def fail_midway(done: int, total: int) -> None:
        if done == 3:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        generate_dataset(tmp_path / "ds", 6, seed=0, image_size=SIZE, progress=fail_midway)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture()
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    from kensa.cli.common import get_settings

    monkeypatch.setenv("KENSA_DATA_DIR", str(tmp_path / "kensa"))
    get_settings.cache_clear()
    yield CliRunner()
    get_settings.cache_clear()


def test_cli_generate_prints_counts(cli: CliRunner, tmp_path: Path) -> None:
    from kensa.cli.main import app

    out = tmp_path / "ds"
    args = [
        "line",
        "generate",
        "--out",
        str(out),
        "--n",
        "8",
        "--seed",
        "2",
        "--image-size",
        "32",
        "--condition",
        "lighting=0.8",
        "--defect-rate",
        "0.5",
    ]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "ok" in result.output and "manifest" in result.output
    rows = read_manifest(out / "manifest.csv")
    assert len(rows) == 8
    assert all(0.6 < float(r["lighting"]) < 1.0 for r in rows)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--n", "4", "--condition", "bogus=1"], "bogus"),
        (["--n", "0"], "at least 1"),
        (["--n", "4", "--image-size", "8"], "32..1024"),
        (["--n", "4", "--defect-rate", "2"], "defect_rate"),
    ],
)
def test_cli_generate_rejects_invalid_input(
    cli: CliRunner, tmp_path: Path, extra: list[str], message: str
) -> None:
    from kensa.cli.main import app

    result = cli.invoke(app, ["line", "generate", "--out", str(tmp_path / "ds"), "--seed", "0", *extra])
    assert result.exit_code == 2
    assert message in result.stderr
    assert not (tmp_path / "ds").exists()


def test_cli_samples_writes_both_sheets(cli: CliRunner, tmp_path: Path) -> None:
    from kensa.cli.main import app

    result = cli.invoke(app, ["line", "samples", "--out", str(tmp_path / "img"), "--image-size", "48"])
    assert result.exit_code == 0, result.output
    for name in ("samples_by_class.png", "samples_by_condition.png"):
        with Image.open(tmp_path / "img" / name) as sheet:
            assert sheet.size[0] > 600 and sheet.size[1] > 400
