"""Shop-floor corruptions: each one moves its own statistic monotonically with severity."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kensa.models.evaluation.corruptions import (
    CORRUPTIONS,
    SEVERITIES,
    apply_corruption,
    corruption_names,
)

EXPECTED = {
    "dim",
    "bright",
    "color_temp",
    "glare",
    "focus_blur",
    "motion_blur",
    "sensor_noise",
    "jpeg",
    "dust",
    "misalign",
}


def _part_image(variant: int, size: int = 128) -> torch.Tensor:
    """A synthetic metal part: mid-grey gradient, machined stripes, a bolt hole, a coloured label.

    Values stay within 40..210 so that brightening and darkening both have room before clipping,
    and the sharp edges give blur something to remove.
    """
    g = torch.Generator().manual_seed(variant)
    ys = torch.arange(size, dtype=torch.float32).view(-1, 1)
    xs = torch.arange(size, dtype=torch.float32).view(1, -1)
    base = 90 + 40 * xs / size + 20 * ys / size  # lamp fall-off
    period = 6 + 3 * variant
    stripes = 25 * (((xs + 2 * ys) // period) % 2)  # machined grooves, hard edges
    cy, cx = size * (0.4 + 0.1 * variant), size * 0.6
    hole = ((ys - cy) ** 2 + (xs - cx) ** 2 < (size * 0.12) ** 2).float()
    grey = base + stripes - 50 * hole + 6 * torch.randn(size, size, generator=g)
    rgb = torch.stack([grey * 1.05, grey, grey * 0.9])
    rgb[0, 10:30, 10:50] = 200  # red label
    rgb[2, 90:110, 20:60] = 190  # blue label
    return rgb.round().clamp(40, 210).to(torch.uint8)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.stack([_part_image(v) for v in range(3)])


def _mean(x: torch.Tensor) -> float:
    return x.float().mean().item()


def _laplacian_var(x: torch.Tensor) -> float:
    grey = x.float().mean(dim=-3, keepdim=True)
    k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    return torch.nn.functional.conv2d(grey, k).var().item()


def _rb_ratio(x: torch.Tensor) -> float:
    f = x.float()
    return (f[..., 0, :, :].mean() / f[..., 2, :, :].mean()).item()


Stat = Callable[[torch.Tensor, torch.Tensor], float]

# (statistic of (corrupted, clean), direction): +1 must strictly rise with severity, -1 fall.
# The clean image counts as severity 0, so severity 1 must already move the statistic.
STATISTICS: dict[str, tuple[Stat, int]] = {
    "dim": (lambda x, c: _mean(x), -1),
    "bright": (lambda x, c: _mean(x), +1),
    "color_temp": (lambda x, c: _rb_ratio(x), +1),
    "focus_blur": (lambda x, c: _laplacian_var(x), -1),
    "motion_blur": (lambda x, c: _laplacian_var(x), -1),
    # Noise adds high-frequency energy; the residual against the clean frame isolates it.
    "sensor_noise": (lambda x, c: _laplacian_var(x.float() - c.float()), +1),
    "jpeg": (lambda x, c: _mean((x.float() - c.float()).abs()), +1),
    "glare": (lambda x, c: _mean((x.float() - c.float()).abs()), +1),
    "dust": (lambda x, c: _mean((x.float() - c.float()).abs()), +1),
    "misalign": (lambda x, c: _mean((x.float() - c.float()).abs()), +1),
}


def test_registry_covers_the_shop_floor() -> None:
    assert set(corruption_names()) >= EXPECTED
    assert set(STATISTICS) == set(corruption_names())
    for c in CORRUPTIONS.values():
        assert len(c.levels) == len(SEVERITIES)
        assert c.description and c.parameter
        report = c.to_dict()
        assert set(report["levels"]) == {"1", "2", "3", "4", "5"}
        assert c.describe(3).startswith(f"{c.name} s3:")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_statistic_moves_monotonically_with_severity(name: str, images: torch.Tensor) -> None:
    stat, direction = STATISTICS[name]
    for i in range(images.shape[0]):
        clean = images[i]
        values = [stat(clean, clean)] + [
            stat(apply_corruption(clean, name, s, seed=0), clean) for s in SEVERITIES
        ]
        steps = [direction * (b - a) for a, b in zip(values, values[1:], strict=False)]
        assert all(step > 0 for step in steps), f"{name} image {i}: {values}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dtype_shape_batch_and_seed(name: str, images: torch.Tensor) -> None:
    batch = apply_corruption(images, name, 3, seed=7)
    assert batch.dtype == torch.uint8
    assert batch.shape == images.shape
    # Same seed, same pixels; each image's result does not depend on the batch it came in.
    assert torch.equal(batch, apply_corruption(images, name, 3, seed=7))
    for i in range(images.shape[0]):
        single = apply_corruption(images[i], name, 3, seed=7)
        assert single.shape == images[i].shape
        assert torch.equal(single, batch[i])
    # Input is not modified in place.
    assert torch.equal(images[0], _part_image(0))


@pytest.mark.parametrize("name", ["glare", "dust", "misalign", "sensor_noise"])
def test_seed_changes_random_geometry(name: str, images: torch.Tensor) -> None:
    assert not torch.equal(
        apply_corruption(images, name, 4, seed=0), apply_corruption(images, name, 4, seed=1)
    )


def test_non_square_image_keeps_its_shape() -> None:
    img = _part_image(1, size=96)[:, :, :80].contiguous()
    for name in corruption_names():
        out = apply_corruption(img, name, 5, seed=3)
        assert out.shape == img.shape and out.dtype == torch.uint8


def test_bad_inputs_are_named() -> None:
    img = _part_image(0, size=32)
    with pytest.raises(ValueError, match="known: .*dim.*misalign"):
        apply_corruption(img, "fog", 1)
    for bad in (0, 6, 2.0):
        with pytest.raises(ValueError, match="severity"):
            apply_corruption(img, "dim", bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="uint8"):
        apply_corruption(img.float(), "dim", 1)
    with pytest.raises(ValueError, match="shape"):
        apply_corruption(img[:1], "dim", 1)
    with pytest.raises(ValueError, match="seed"):
        apply_corruption(img, "dim", 1, seed=-1)
