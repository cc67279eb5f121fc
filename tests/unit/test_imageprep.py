"""The one image recipe: training and serving give the same pixels, aspect kept, ROI, squash, refusals."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image, ImageDraw
from serving_helpers import build_contract_model

from kensa.models.data.imageprep import Preprocess, as_preprocess, check_image_size, preprocess_from_config
from kensa.models.data.parts import load_image
from kensa.models.onnx.contract import PREPROCESS_KEY, read_metadata, read_preprocess
from kensa.serving.inference.decode import decode_image

GREY = 114
WHITE = (250, 250, 250)


def part_photo(width: int = 300, height: int = 180) -> Image.Image:
    """A non-square photo: textured background, a white circle (diameter 0.5 × height) in the
    middle, a green square in the right half and a red one in the left half."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 7) % 256, (yy * 5) % 256, ((xx + yy) * 3) % 256], axis=2).astype(np.uint8)
    img = Image.fromarray(base // 3 + 30, "RGB")
    draw = ImageDraw.Draw(img)
    r = height // 4
    cx, cy = width // 2, height // 2
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=WHITE)
    draw.rectangle(
        (int(0.72 * width), int(0.2 * height), int(0.9 * width), int(0.5 * height)), fill=(0, 200, 0)
    )
    draw.rectangle(
        (int(0.1 * width), int(0.2 * height), int(0.28 * width), int(0.5 * height)), fill=(220, 0, 0)
    )
    return img


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def training_pixels(tmp_path: Path, data: bytes, fmt: str, recipe: Preprocess | int) -> np.ndarray:
    path = tmp_path / f"part.{fmt.lower()}"
    path.write_bytes(data)
    return load_image(path, recipe).permute(1, 2, 0).numpy()


def white_box(pixels: np.ndarray) -> tuple[int, int]:
    """Width and height of the bounding box of the near-white pixels (the circle)."""
    ys, xs = np.nonzero(pixels.min(axis=2) > 200)
    return int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


# ---------------------------------------------------------------- training == serving


@pytest.mark.parametrize("size", [128, 256])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize(
    "recipe",
    [
        {"fit": "letterbox"},
        {"fit": "roi", "roi": (0.5, 0.0, 1.0, 1.0)},
        {"fit": "squash"},
    ],
    ids=["letterbox", "roi", "squash"],
)
def test_training_and_serving_decode_to_identical_pixels(
    tmp_path: Path, size: int, fmt: str, recipe: dict[str, object]
) -> None:
    prep = Preprocess(size, **recipe)  # type: ignore[arg-type]
    for shape in ((300, 180), (1200, 720)):  # draft at 1/2 and at 1/4 for a 128 px model
        data = encoded(part_photo(*shape), fmt)
        served = decode_image(data, prep, 10**7).pixels
        trained = training_pixels(tmp_path, data, fmt, prep)
        assert served.shape == (size, size, 3) and served.dtype == np.uint8
        assert np.array_equal(served, trained), f"{fmt} {shape} at {size} px: training and serving differ"


def test_the_jpeg_path_really_drafts_and_a_full_decode_would_differ(tmp_path: Path) -> None:
    """What the identity above guards against: a 300 × 180 JPEG for a 128 px model decodes at
    half scale, which is not the pixels of a full decode."""
    data = encoded(part_photo(), "JPEG")
    prep = Preprocess(128)
    drafted = Image.open(io.BytesIO(data)).draft("RGB", prep.draft_request(300, 180))
    assert drafted is not None and drafted[1][2] == 150.0  # decoded at 1/2 scale
    full = prep.prepare(Image.open(io.BytesIO(data)).convert("RGB"))  # loaded: no draft
    assert not np.array_equal(full, decode_image(data, prep, 10**7).pixels)


def test_draft_never_leaves_fewer_pixels_than_the_crop_needs() -> None:
    for prep in (Preprocess(128), Preprocess(256, "roi", (0.25, 0.1, 0.75, 0.9)), Preprocess(384, "squash")):
        for w, h in ((2000, 1200), (1200, 2000), (640, 480), (4000, 300)):
            img = Image.open(io.BytesIO(encoded(Image.new("RGB", (w, h)), "JPEG")))
            _, box = img.draft("RGB", prep.draft_request(w, h)) or ("", (0, 0, w, h))
            x0, y0, x1, y1 = prep.roi or (0, 0, 1, 1)
            tw, th = prep.content_size(w, h)
            # At least the content's pixels, or the whole image where even that is fewer.
            assert (x1 - x0) * box[2] >= min(tw, (x1 - x0) * w), (prep, w, h)
            assert (y1 - y0) * box[3] >= min(th, (y1 - y0) * h), (prep, w, h)
            assert box[2] < w or (x1 - x0) * w / 2 < tw or (y1 - y0) * h / 2 < th  # drafted when it can


# ---------------------------------------------------------------- what each fit does


@pytest.mark.parametrize("size", [128, 256])
def test_letterbox_keeps_a_circle_round_and_pads_with_grey(size: int) -> None:
    pixels = decode_image(encoded(part_photo(), "JPEG"), Preprocess(size), 10**7).pixels
    w, h = white_box(pixels)
    assert abs(w - h) <= 1 and w == pytest.approx(size * 90 / 300, abs=2)
    pad = (size - round(size * 180 / 300)) // 2  # 300 × 180 → size × 0.6·size, centred
    assert (pixels[: pad - 1] == GREY).all() and (pixels[size - pad + 1 :] == GREY).all()
    assert not (pixels[size // 2] == GREY).all()
    squashed = decode_image(encoded(part_photo(), "JPEG"), Preprocess(size, "squash"), 10**7).pixels
    sw, sh = white_box(squashed)
    assert sh > 1.5 * sw  # what squash did to the same circle


def test_roi_crops_the_region_it_names() -> None:
    data = encoded(part_photo(), "PNG")
    right = decode_image(data, Preprocess(128, "roi", (0.5, 0.0, 1.0, 1.0)), 10**7).pixels
    left = decode_image(data, Preprocess(128, "roi", (0.0, 0.0, 0.5, 1.0)), 10**7).pixels

    def has(pixels: np.ndarray, rgb: tuple[int, int, int]) -> bool:
        return bool((np.abs(pixels.astype(int) - rgb).max(axis=2) < 30).any())

    assert has(right, (0, 200, 0)) and not has(right, (220, 0, 0))
    assert has(left, (220, 0, 0)) and not has(left, (0, 200, 0))
    # 150 × 180 crop → 107 × 128 content, centred: the green square's middle (x 0.81, y 0.35 of
    # the photo) lands at x = 10 + (0.81 - 0.5) / 0.5 · 107, y = 0.35 · 128.
    assert tuple(right[45, 10 + 66]) == pytest.approx((0, 200, 0), abs=2)
    assert (right[:, :9] == GREY).all() and (right[:, -9:] == GREY).all()


def test_squash_and_a_bare_size_keep_the_old_recipe(tmp_path: Path) -> None:
    photo = part_photo()
    old = np.asarray(photo.resize((128, 128), Image.Resampling.BILINEAR))  # old training, PNG
    png = encoded(photo, "PNG")
    assert np.array_equal(decode_image(png, Preprocess(128, "squash"), 10**7).pixels, old)
    assert np.array_equal(decode_image(png, 128, 10**7).pixels, old)
    assert np.array_equal(training_pixels(tmp_path, png, "PNG", 128), old)
    jpeg = encoded(photo, "JPEG")
    img = Image.open(io.BytesIO(jpeg))
    img.draft("RGB", (128, 128))  # old serving: draft to the square, then resize
    old_jpeg = np.asarray(img.convert("RGB").resize((128, 128), Image.Resampling.BILINEAR))
    assert np.array_equal(decode_image(jpeg, Preprocess(128, "squash"), 10**7).pixels, old_jpeg)
    assert as_preprocess(128) == Preprocess(128, "squash")


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("size", [16, 31, 385, 512, True, "256"])
def test_sizes_outside_the_accepted_range_are_refused(size: object) -> None:
    from kensa.models.train.trainer import TrainConfig

    with pytest.raises(ValueError, match="from 32 to 384 px") as err:
        check_image_size(size)
    assert "128-384" in str(err.value)
    with pytest.raises(ValueError, match="from 32 to 384 px"):
        TrainConfig(image_size=size).validate()  # type: ignore[arg-type]
    for ok in (32, 128, 384):
        assert check_image_size(ok) == ok


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 0}, "from 8 to 4096"),
        ({"size": 128, "fit": "stretch"}, "letterbox, roi, squash"),
        ({"size": 128, "fit": "roi"}, "needs a region of interest"),
        ({"size": 128, "fit": "letterbox", "roi": (0, 0, 0.5, 0.5)}, "only used with fit 'roi'"),
        ({"size": 128, "fit": "roi", "roi": (-0.1, 0, 0.5, 1)}, "0 ≤ x0 < x1 ≤ 1"),
        ({"size": 128, "fit": "roi", "roi": (0, 0, 1.2, 1)}, "0 ≤ x0 < x1 ≤ 1"),
        ({"size": 128, "fit": "roi", "roi": (0.5, 0, 0.5, 1)}, "0 ≤ x0 < x1 ≤ 1"),
        ({"size": 128, "fit": "roi", "roi": (0, 0.7, 1, 0.2)}, "0 ≤ y0 < y1 ≤ 1"),
        ({"size": 128, "fit": "roi", "roi": (0, 0, 1)}, "four numbers"),
        ({"size": 128, "pad": 300}, "0-255"),
    ],
)
def test_bad_recipes_are_refused_naming_what_is_accepted(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Preprocess(**kwargs)  # type: ignore[arg-type]


def test_a_roi_smaller_than_a_pixel_is_refused_by_serving_as_a_422() -> None:
    from kensa.serving.errors import ApiError

    tiny = Preprocess(128, "roi", (0.5, 0.5, 0.501, 0.6))
    with pytest.raises(ApiError) as err:
        decode_image(encoded(part_photo(), "PNG"), tiny, 10**7)
    assert err.value.status == 422 and "at least one pixel" in err.value.detail


def test_kensa_train_refuses_a_bad_size_or_roi_before_reading_data(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kensa.cli.main import app

    base = ["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, [*base, "--image-size", "512"])
    assert result.exit_code == 2 and "from 32 to 384 px" in result.stderr
    result = CliRunner().invoke(app, [*base, "--roi", "0.5,0,0.2,1"])
    assert result.exit_code == 2 and "0 ≤ x0 < x1 ≤ 1" in result.stderr
    result = CliRunner().invoke(app, [*base, "--fit", "roi"])
    assert result.exit_code == 2 and "needs a region of interest" in result.stderr


# ---------------------------------------------------------------- the recipe is recorded


def test_recipe_round_trips_and_old_records_mean_squash() -> None:
    prep = Preprocess(256, "roi", (0.1, 0.2, 0.9, 0.8))
    assert Preprocess.from_json(prep.to_json()) == prep
    assert Preprocess.from_json(prep.to_dict(), 256) == prep
    with pytest.raises(ValueError, match="differs from the model's input size 128"):
        Preprocess.from_json(prep.to_json(), 128)
    assert preprocess_from_config({"model": "small_cnn"}, 64) == Preprocess(64, "squash")
    assert preprocess_from_config({"fit": "roi", "roi": [0.1, 0.2, 0.9, 0.8]}, 256) == prep


def test_export_metadata_records_the_training_recipe() -> None:
    from torch import nn

    from kensa.models.onnx.export import build_metadata
    from kensa.models.train.trainer import LoadedModel, TrainConfig

    config = TrainConfig(image_size=256, fit="roi", roi=(0.1, 0.2, 0.9, 0.8))
    loaded = LoadedModel(nn.Identity(), "m", ["ok", "defect_x"], 256, vars(config), "v", Path("."), {})
    meta = build_metadata(loaded, {"t_ok": 0.3, "t_defect": 0.7}, pca_dims=2)
    assert meta[PREPROCESS_KEY] == {"size": 256, "fit": "roi", "roi": [0.1, 0.2, 0.9, 0.8], "pad": GREY}
    assert read_preprocess(meta) == config.preprocess(256)
    assert TrainConfig().fit == "letterbox"  # new runs keep the aspect unless told otherwise


def test_serving_reads_the_recipe_and_old_files_get_squash(tmp_path: Path) -> None:
    from kensa.serving.inference.artifact import ModelRefused, load_and_check

    old = build_contract_model(tmp_path / "old.onnx")
    assert PREPROCESS_KEY not in read_metadata(old)
    assert load_and_check(old, None)[1].preprocess == Preprocess(32, "squash")

    def with_recipe(name: str, value: str) -> Path:
        proto = onnx.load(str(old))
        entry = proto.metadata_props.add()
        entry.key, entry.value = PREPROCESS_KEY, value
        path = tmp_path / name
        onnx.save(proto, str(path))
        return path

    good = with_recipe("lb.onnx", Preprocess(32).to_json())
    assert load_and_check(good, None)[1].preprocess == Preprocess(32, "letterbox")
    for name, bad in (("roi.onnx", '{"fit": "roi"}'), ("size.onnx", '{"size": 64, "fit": "letterbox"}')):
        with pytest.raises(ModelRefused) as err:
            load_and_check(with_recipe(name, bad), None)
        assert err.value.step == "metadata" and PREPROCESS_KEY in err.value.reason


def test_a_job_decoded_for_another_recipe_is_decoded_again() -> None:
    from kensa.serving.inference.batcher import _fits
    from kensa.serving.inference.decode import tensor_image

    data = encoded(part_photo(), "PNG")
    squashed = decode_image(data, Preprocess(128, "squash"), 10**7)
    assert _fits(squashed, Preprocess(128, "squash"))
    assert not _fits(squashed, Preprocess(128))  # same size, other recipe: decode again
    assert not _fits(squashed, Preprocess(64, "squash"))
    assert _fits(tensor_image(squashed.pixels), Preprocess(128))  # a raw tensor: size only
