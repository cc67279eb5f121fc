"""The synthetic line: deterministic images of machined parts, defects and shop-floor conditions.

Each image shows one metal part (variant ``A`` rectangular plate, ``B`` turned round flange, ``C``
link bracket) on a rubber conveyor belt, lit from the upper left, as one of two cameras on a line
sees it. Defects (scratch, dent, stain, missing hole, crack) have a severity drawn per part, so
some are obvious and some barely visible; ok parts carry nuisance marks (oil spots, tool marks,
dust) that look a little like defects. The line conditions (lighting, colour temperature, glare,
blur, noise, camera offset and rotation) are a frozen :class:`LineConditions`; each part jitters
around them, and the values actually used are recorded in its :class:`PartRecord`.

Determinism: every random draw comes from ``numpy`` generators seeded by ``(part seed, stream)``;
the draws never depend on the condition values or on the forced label, so the same part can be
re-rendered under other conditions or with another defect and only that one thing changes.

Units: lengths in "px" (blur, shift, defect widths) are pixels of a 128-px image and scale with
``image_size``, so the same conditions mean the same optics at any resolution; ``noise`` is a
sigma in 0..255 grey levels at any size.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from kensa.settings import DEFAULT_CLASSES

CLASSES: tuple[str, ...] = DEFAULT_CLASSES
DEFECT_TYPES: tuple[str, ...] = CLASSES[1:]
VARIANTS: tuple[str, ...] = ("A", "B", "C")
CAMERAS: tuple[str, ...] = ("C1", "C2")
# Per-part condition values recorded in PartRecord.conditions and in manifest.csv, in this order.
CONDITION_COLUMNS: tuple[str, ...] = (
    "lighting",
    "color_temp",
    "glare",
    "focus_blur",
    "motion_blur",
    "noise",
    "shift",
    "rotation",
)
MANIFEST_COLUMNS: tuple[str, ...] = (
    "path",
    "label",
    "part_id",
    "line",
    "camera",
    "variant",
    *CONDITION_COLUMNS,
)
MANIFEST_NAME = "manifest.csv"
MARKER_NAME = ".kensa-line.json"  # marks a folder as our output, so re-generating may replace it
GENERATOR_VERSION = 1
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 1024
REFERENCE_SIZE = 128  # "px" parameters are pixels at this image size

# Value sweeps that show each condition from mild to severe (sample sheets, robustness checks).
CONDITION_SWEEPS: dict[str, tuple[float, ...]] = {
    "lighting": (0.5, 0.75, 1.0, 1.25, 1.5),
    "color_temp": (3000.0, 4000.0, 5500.0, 7000.0, 9000.0),
    "glare": (0.0, 0.25, 0.5, 0.75, 1.0),
    "focus_blur": (0.0, 1.0, 2.0, 3.0, 4.0),
    "motion_blur": (0.0, 2.0, 4.0, 6.0, 8.0),
    "noise": (0.0, 4.0, 8.0, 16.0, 24.0),
    "shift": (-16.0, -8.0, 0.0, 8.0, 16.0),
    "rotation": (-30.0, -15.0, 0.0, 15.0, 30.0),
}

# Accepted range of each numeric condition: wide enough for harsh drift, tight enough for typos.
_RANGES: dict[str, tuple[float, float]] = {
    "lighting": (0.05, 5.0),
    "color_temp": (1500.0, 15000.0),
    "glare": (0.0, 1.0),
    "focus_blur": (0.0, 20.0),
    "motion_blur": (0.0, 50.0),
    "noise": (0.0, 100.0),
    "shift": (-128.0, 128.0),
    "rotation": (-180.0, 180.0),
    "defect_rate": (0.0, 1.0),
    "jitter": (0.0, 5.0),
}
_LINE_RE = re.compile(r"^[A-Za-z0-9_]{1,32}$")


@dataclass(frozen=True)
class LineConditions:
    """Nominal conditions of a line; each part jitters around them (``jitter`` scales it, 0 = none).

    - ``lighting``: gain, 1 nominal.
    - ``color_temp``: light colour in Kelvin; the camera is white-balanced for 5500 K, so lower
      is redder.
    - ``glare``: 0..1 strength of a specular reflection blob.
    - ``focus_blur``: defocus Gaussian sigma, px. ``motion_blur``: horizontal smear length, px
      (the conveyor runs along x).
    - ``noise``: sensor noise sigma in grey levels (0..255).
    - ``shift``: camera offset in px along the down-right diagonal (negative = up-left).
    - ``rotation``: camera rotation in degrees, clockwise.
    - ``variant``: ``A``, ``B``, ``C`` or ``mix``. ``camera``: ``C1``, ``C2`` or ``mix``.
      ``line``: the line's name, as in part ids.
    - ``defect_rate``: share of defective parts. ``defect_mix``: relative weights of defect types
      among defectives, e.g. ``(("defect_scratch", 2.0), ("defect_crack", 1.0))``; empty = equal.
    """

    lighting: float = 1.0
    color_temp: float = 5500.0
    glare: float = 0.1
    focus_blur: float = 0.5
    motion_blur: float = 0.0
    noise: float = 2.0
    shift: float = 0.0
    rotation: float = 0.0
    variant: str = "mix"
    defect_rate: float = 0.3
    defect_mix: tuple[tuple[str, float], ...] = ()
    line: str = "L1"
    camera: str = "mix"
    jitter: float = 1.0

    def __post_init__(self) -> None:
        for name, (lo, hi) in _RANGES.items():
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"condition {name} must be a number; got {value!r}")
            if not lo <= value <= hi:
                raise ValueError(
                    f"condition {name}={value} is outside the accepted range {lo}..{hi}"
                )
        if self.variant not in (*VARIANTS, "mix"):
            raise ValueError(
                f"condition variant={self.variant!r}; accepted: {', '.join(VARIANTS)}, mix"
            )
        if self.camera not in (*CAMERAS, "mix"):
            raise ValueError(
                f"condition camera={self.camera!r}; accepted: {', '.join(CAMERAS)}, mix"
            )
        if not _LINE_RE.match(self.line):
            raise ValueError(f"condition line={self.line!r}; use 1-32 letters, digits or '_'")
        object.__setattr__(self, "defect_mix", _normalise_mix(_parse_mix(self.defect_mix)))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Names accepted by :meth:`with_overrides`."""
        return tuple(f.name for f in fields(cls))

    def with_overrides(self, overrides: Mapping[str, object] | Iterable[str]) -> LineConditions:
        """Return a copy with some conditions changed.

        ``overrides`` is a mapping ``{"lighting": 0.6}`` or strings ``"lighting=0.6"``; values may
        be strings either way, ``defect_mix`` as ``"scratch:2,crack:1"``. Raises ``ValueError``
        naming an unknown condition and listing the valid ones, or a value that does not parse.
        """
        pairs = overrides.items() if isinstance(overrides, Mapping) else map(_split_pair, overrides)
        known = set(self.names())
        changes: dict[str, Any] = {}
        for name, raw in pairs:
            if name not in known:
                valid = ", ".join(self.names())
                raise ValueError(f"unknown condition {name!r}; valid conditions: {valid}")
            changes[name] = _coerce(name, raw)
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values of every condition."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["defect_mix"] = {k: w for k, w in self.defect_mix}
        return out


def _split_pair(item: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"condition {item!r} is not of the form name=value")
    return name.strip(), value.strip()


def _coerce(name: str, raw: object) -> object:
    if name in _RANGES:
        try:
            return float(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"condition {name} needs a number; got {raw!r}") from None
    if name == "defect_mix":
        return _parse_mix(raw)
    return str(raw)


def _parse_mix(raw: object) -> tuple[tuple[str, float], ...]:
    """Defect weights from ``"scratch:2,crack"``, a mapping, or (type, weight) pairs."""
    try:
        if isinstance(raw, Mapping):
            items = list(raw.items())
        elif isinstance(raw, str):
            items = [_split_weight(part) for part in raw.split(",") if part.strip()]
        else:
            items = list(raw)  # type: ignore[call-overload]
        return tuple((str(k), float(w)) for k, w in items)
    except (TypeError, ValueError):
        msg = f"defect_mix must be type:weight pairs like 'scratch:2,crack:1'; got {raw!r}"
        raise ValueError(msg) from None


def _split_weight(part: str) -> tuple[str, float]:
    name, _, weight = part.partition(":")
    return name.strip(), float(weight) if weight.strip() else 1.0


def _normalise_mix(mix: Iterable[tuple[str, float]]) -> tuple[tuple[str, float], ...]:
    out: dict[str, float] = {}
    for name, weight in mix:
        full = name if name.startswith("defect_") else f"defect_{name}"
        if full not in DEFECT_TYPES:
            valid = ", ".join(d.removeprefix("defect_") for d in DEFECT_TYPES)
            raise ValueError(f"defect_mix names unknown defect {name!r}; valid: {valid}")
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"defect_mix weight of {name} must be >= 0; got {weight}")
        out[full] = float(weight)
    if out and sum(out.values()) <= 0:
        raise ValueError("defect_mix weights must not all be zero")
    return tuple((d, out[d]) for d in DEFECT_TYPES if d in out)


@dataclass(frozen=True)
class PartRecord:
    """What the line knows about one imaged part.

    ``conditions`` holds the per-part values actually used (after jitter), keyed by
    :data:`CONDITION_COLUMNS`. ``defect_severity`` is 0 (barely visible) .. 1 (obvious) and
    ``defect_box`` the defect's pixel box ``(x0, y0, x1, y1)``; both ``None`` for ok parts.
    """

    part_id: str
    label: str
    line: str
    camera: str
    variant: str
    seed: int
    conditions: dict[str, float] = field(default_factory=dict)
    defect_severity: float | None = None
    defect_box: tuple[int, int, int, int] | None = None

    def manifest_row(self, path: str) -> dict[str, str]:
        """One manifest.csv row; ``path`` is relative to the dataset folder, with ``/``."""
        row = {
            "path": path,
            "label": self.label,
            "part_id": self.part_id,
            "line": self.line,
            "camera": self.camera,
            "variant": self.variant,
        }
        row.update({k: _fmt(self.conditions[k]) for k in CONDITION_COLUMNS})
        return row


def _fmt(value: float) -> str:
    # Fixed precision keeps manifest bytes identical across runs and platforms.
    return f"{value:.4f}".rstrip("0").rstrip(".") if value != 0 else "0"


# ---------------------------------------------------------------------------------------------
# Part geometry. Part-frame units: the image spans -1..1, so a part is roughly 1.5 units wide.
# Signed distance functions (negative inside) give anti-aliased edges and bevel normals cheaply.
# ---------------------------------------------------------------------------------------------

Hole = tuple[float, float, float]  # centre x, centre y, radius


@dataclass(frozen=True)
class _Variant:
    holes: tuple[Hole, ...]
    omittable: tuple[int, ...]  # holes a "missing hole" defect may drop (not the main bore)
    turned: bool  # lathe-turned (concentric marks) rather than brushed (straight marks)


_VARIANTS: dict[str, _Variant] = {
    "A": _Variant(  # stamped plate: main bore, four corner holes, two pin holes
        holes=(
            (0.0, 0.0, 0.17),
            (-0.56, -0.34, 0.07),
            (0.56, -0.34, 0.07),
            (-0.56, 0.34, 0.07),
            (0.56, 0.34, 0.07),
            (-0.32, 0.0, 0.045),
            (0.32, 0.0, 0.045),
        ),
        omittable=(1, 2, 3, 4, 5, 6),
        turned=False,
    ),
    "B": _Variant(  # turned flange: bore and six bolt holes on a pitch circle
        holes=((0.0, 0.0, 0.24),)
        + tuple(
            (0.5 * math.cos(a * math.pi / 3), 0.5 * math.sin(a * math.pi / 3), 0.06)
            for a in range(6)
        ),
        omittable=(1, 2, 3, 4, 5, 6),
        turned=True,
    ),
    "C": _Variant(  # link bracket: two eye holes and two pin holes
        holes=((-0.5, 0.0, 0.13), (0.5, 0.0, 0.13), (-0.17, 0.0, 0.045), (0.17, 0.0, 0.045)),
        omittable=(0, 1, 2, 3),
        turned=False,
    ),
}


def _norm(x: Any, y: Any) -> Any:
    # np.hypot guards against overflow we cannot have here, at five times the cost.
    return np.sqrt(x * x + y * y)


def _sd_outer(variant: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    if variant == "A":  # rounded rectangle, half size 0.74 x 0.52, corner radius 0.1
        dx, dy = np.abs(x) - 0.64, np.abs(y) - 0.42
        out = _norm(np.maximum(dx, 0), np.maximum(dy, 0))
        return out + np.minimum(np.maximum(dx, dy), 0) - 0.1
    if variant == "B":
        return _norm(x, y) - 0.74
    return _norm(x - np.clip(x, -0.5, 0.5), y) - 0.29  # capsule


def _sd_holes(holes: Iterable[Hole], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d = np.full(np.shape(x), 9.0, dtype=np.float32)
    for cx, cy, r in holes:
        d = np.minimum(d, _norm(x - cx, y - cy) - r)
    return d


def _sd_material(variant: str, holes: Iterable[Hole], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.maximum(_sd_outer(variant, x, y), -_sd_holes(holes, x, y))


# ---------------------------------------------------------------------------------------------
# Shared per-size precomputation: pixel grid, vignetting and texture banks (fixed seed, cached).
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Bank:
    x: np.ndarray  # (S, S) camera-frame coordinates, -1..1
    y: np.ndarray
    vignette: np.ndarray  # (S, S) lens falloff
    brushed: tuple[np.ndarray, ...]  # (T, T) streaks along x, zero mean unit std
    rings: tuple[np.ndarray, ...]  # (R,) radial profiles for turned surfaces
    grain: tuple[np.ndarray, ...]  # (S, S) fine isotropic micro-texture
    belt: tuple[np.ndarray, ...]  # (S, S) belt rubber texture
    noise: tuple[np.ndarray, ...]  # (3, 2S, 2S) standard normal sensor noise; none above 256 px


# Up to this size sensor noise is a random window of a cached tile (drawing fresh normals would
# be a third of the render time); above it the tiles would cost hundreds of MB, so draw per part.
_NOISE_TILE_MAX = 256


@lru_cache(maxsize=4)
def _bank(size: int) -> _Bank:
    rng = np.random.default_rng([7_357, size])  # fixed: the bank is part of the line, not the part
    k = size / REFERENCE_SIZE
    coords = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1).astype(np.float32)
    x, y = np.meshgrid(coords, coords)
    vignette = (1 - 0.12 * (x * x + y * y)).astype(np.float32)
    tile = min(2 * size, 1024)

    def norm(a: np.ndarray) -> np.ndarray:
        return ((a - a.mean()) / (a.std() + 1e-8)).astype(np.float32)

    brushed, rings, grain, belt, sensor = [], [], [], [], []
    for _ in range(4):
        noise = rng.standard_normal((tile, tile)).astype(np.float32)
        # Streaks no thinner than ~a pixel, else small images alias into scan lines.
        streaks = ndimage.gaussian_filter(noise, sigma=(max(0.5 * k, 0.7), 14 * k), mode="wrap")
        brushed.append(norm(streaks))
        radial = ndimage.gaussian_filter1d(rng.standard_normal(4 * size), 0.6 * k, mode="wrap")
        rings.append(norm(radial))
        grain.append(norm(ndimage.gaussian_filter(rng.standard_normal((size, size)), 0.6 * k)))
        fine = norm(
            ndimage.gaussian_filter(rng.standard_normal((size, size)), 0.7 * k, mode="wrap")
        )
        coarse = norm(
            ndimage.gaussian_filter(rng.standard_normal((size, size)), 6 * k, mode="wrap")
        )
        belt.append(norm(fine + 0.6 * coarse))
        if size <= _NOISE_TILE_MAX:
            sensor.append(rng.standard_normal((3, 2 * size, 2 * size), dtype=np.float32))
    return _Bank(
        x, y, vignette, tuple(brushed), tuple(rings), tuple(grain), tuple(belt), tuple(sensor)
    )


def _kelvin_rgb(kelvin: float) -> np.ndarray:
    """Light colour relative to the 5500 K white balance, luminance-normalised (Helland's fit)."""

    def raw(k: float) -> np.ndarray:
        t = k / 100
        r = 255.0 if t <= 66 else 329.698727446 * (t - 60) ** -0.1332047592
        g = (
            99.4708025861 * math.log(t) - 161.1195681661
            if t <= 66
            else 288.1221695283 * (t - 60) ** -0.0755148492
        )
        b = (
            255.0
            if t >= 66
            else (0.0 if t <= 19 else 138.5177312231 * math.log(t - 10) - 305.0447927307)
        )
        return np.clip(np.array([r, g, b]), 1.0, 255.0)

    rgb = raw(kelvin) / raw(5500.0)
    return (rgb / (rgb @ np.array([0.2126, 0.7152, 0.0722]))).astype(np.float32)


# Per-camera nominal light: gain, tint, highlight position. C2 sits at the other end of the hood.
_CAMERA_LIGHT: dict[str, tuple[float, tuple[float, float, float], tuple[float, float]]] = {
    "C1": (1.0, (1.0, 1.0, 1.0), (-0.3, -0.35)),
    "C2": (0.92, (0.985, 1.0, 1.03), (0.25, -0.3)),
}
_LIGHT_DIR = (-0.6, -0.8)  # unit vector towards the light, camera frame (y down)
_BELT_TINT = np.array([0.93, 1.0, 0.97], np.float32)  # dark green-grey rubber


# ---------------------------------------------------------------------------------------------
# Rendering one part.
# ---------------------------------------------------------------------------------------------


@dataclass
class _Scene:
    """A part being drawn: its frame, geometry and the metal luminance that defects edit."""

    size: int
    variant: str
    holes: list[Hole]
    qx: np.ndarray  # (S, S) part-frame coordinates of each pixel
    qy: np.ndarray
    cos: float
    sin: float
    scale: float
    cx: float
    cy: float
    light: np.ndarray  # (2,) direction towards the light, in the part frame
    lum: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (S, S) metal
    chroma: np.ndarray | None = None  # (3, S, S) metal colour multiplier, made on first stain

    @property
    def px(self) -> float:  # part units per output pixel
        return 2.0 / (self.size * self.scale)

    @property
    def pr(self) -> float:  # part units per reference (128-px) pixel
        return 2.0 / (REFERENCE_SIZE * self.scale)

    def window(self, x: float, y: float, radius: float) -> tuple[slice, slice]:
        """Pixel rows/cols around part-frame point (x, y) covering ``radius`` part units."""
        half = self.size / 2
        col = (self.scale * (self.cos * x - self.sin * y) + self.cx + 1) * half - 0.5
        row = (self.scale * (self.sin * x + self.cos * y) + self.cy + 1) * half - 0.5
        r = radius * self.scale * half + 3
        c0, c1 = int(np.clip(col - r, 0, self.size)), int(np.clip(col + r + 1, 0, self.size))
        r0, r1 = int(np.clip(row - r, 0, self.size)), int(np.clip(row + r + 1, 0, self.size))
        return slice(r0, max(r1, r0 + 1)), slice(c0, max(c1, c0 + 1))

    def line_profile(self, dist: np.ndarray, width_ref: float) -> np.ndarray:
        """Gaussian cross-section of a line ``width_ref`` px wide; thinner than a pixel fades."""
        sigma = width_ref * self.pr / 2
        eff = max(sigma, 0.45 * self.px)
        return np.asarray((sigma / eff) * np.exp(-0.5 * (dist / eff) ** 2), np.float32)

    def hole_field(self) -> np.ndarray:
        """Distance to the nearest hole over the image, computed only near holes (speed).

        Far from every hole the value stays large, which is all the shading needs there.
        """
        d = np.full(self.qx.shape, 9.0, np.float32)
        for hx, hy, r in self.holes:
            win = self.window(hx, hy, r + 12 * self.pr)
            np.minimum(d[win], _norm(self.qx[win] - hx, self.qy[win] - hy) - r, out=d[win])
        return d

    def tint(self, win: tuple[slice, slice], mask: np.ndarray, rgb: tuple[float, ...]) -> None:
        if self.chroma is None:
            self.chroma = np.ones((3, self.size, self.size), np.float32)
        self.chroma[:, win[0], win[1]] *= (
            1 + mask * (np.asarray(rgb, np.float32) - 1)[:, None, None]
        )


def _pick(
    rng: np.random.Generator, variant: str, holes: list[Hole], lo: float, hi: float
) -> np.ndarray:
    """A point on the part whose distance to an edge lies in (-hi, -lo); fixed draw count."""
    pts = rng.uniform(-0.8, 0.8, size=(48, 2))
    d = _sd_material(variant, holes, pts[:, 0], pts[:, 1])
    good = np.flatnonzero((d < -lo) & (d > -hi))
    return np.asarray(pts[good[0] if good.size else int(np.argmin(d))])


def _polyline_dist(x: np.ndarray, y: np.ndarray, pts: np.ndarray) -> np.ndarray:
    d = np.full(x.shape, 9.0, np.float32)
    for (ax, ay), (bx, by) in zip(pts[:-1], pts[1:], strict=True):
        ex, ey = bx - ax, by - ay
        t = np.clip(((x - ax) * ex + (y - ay) * ey) / max(ex * ex + ey * ey, 1e-12), 0, 1)
        d = np.minimum(d, _norm(x - ax - t * ex, y - ay - t * ey))
    return d


def _blob(
    rng: np.random.Generator,
    x: np.ndarray,
    y: np.ndarray,
    c: np.ndarray,
    radius: float,
    edge: float,
) -> np.ndarray:
    """Irregular soft blob (a few overlapping Gaussians, thresholded); ``edge`` sets softness."""
    offs = rng.normal(0, 0.45 * radius, size=(4, 2))
    radii = radius * rng.uniform(0.45, 0.8, size=4)
    f = np.zeros(x.shape, np.float32)
    for (ox, oy), r in zip(offs, radii, strict=True):
        f += np.exp(-((x - c[0] - ox) ** 2 + (y - c[1] - oy) ** 2) / (r * r))
    return np.asarray(np.clip((f - 0.5) / edge + 0.5, 0, 1), np.float32)


def _severity(rng: np.random.Generator) -> tuple[float, float, float]:
    """Severity with its size and contrast parts (0..1 each), which disagree a little, as on
    real parts; the severity reported is their mean."""
    s = float(rng.random()) ** 0.6  # skewed: about one defect in six lands in the subtle third
    size, contrast = np.clip(s + rng.normal(0, 0.15, 2), 0, 1)
    return (float(size) + float(contrast)) / 2, float(size), float(contrast)


def _lerp(lo: float, hi: float, t: float) -> float:
    return lo + (hi - lo) * t


def _scratch(sc: _Scene, rng: np.random.Generator) -> tuple[float, tuple[slice, slice]]:
    s, ts, tc = _severity(rng)
    c = _pick(rng, sc.variant, sc.holes, 0.03, 9)
    length, ang, bend = _lerp(0.12, 0.6, ts), rng.uniform(0, np.pi), rng.normal(0, 0.12)
    width, amp = _lerp(1.0, 2.6, ts), _lerp(0.08, 0.6, tc) * (1 if rng.random() < 0.65 else -1)
    t = np.linspace(0, 1, 6)[:, None]
    d, perp = np.array([np.cos(ang), np.sin(ang)]), np.array([-np.sin(ang), np.cos(ang)])
    pts = c + (t - 0.5) * length * d + 4 * t * (1 - t) * bend * length * perp
    win = sc.window(c[0], c[1], length / 2 + abs(bend) * length + 0.02)
    prof = sc.line_profile(_polyline_dist(sc.qx[win], sc.qy[win], pts), width)
    sc.lum[win] += amp * prof  # bright scratches catch the light, dark ones cut through the finish
    return s, win


def _dent(sc: _Scene, rng: np.random.Generator) -> tuple[float, tuple[slice, slice]]:
    s, ts, tc = _severity(rng)
    c = _pick(rng, sc.variant, sc.holes, 0.06, 9)
    radius, depth = _lerp(0.05, 0.16, ts), _lerp(0.06, 0.45, tc)
    win = sc.window(c[0], c[1], 2.2 * radius)
    dx, dy = sc.qx[win] - c[0], sc.qy[win] - c[1]
    h = np.exp(-(dx * dx + dy * dy) / (radius * radius))
    # A depression: the wall nearest the light faces away from it (dark), the far wall is lit.
    slope = -2 * (dx * sc.light[0] + dy * sc.light[1]) / radius * h * 1.17
    sc.lum[win] += depth * (slope - 0.3 * h)
    return s, win


def _stain(sc: _Scene, rng: np.random.Generator) -> tuple[float, tuple[slice, slice]]:
    s, ts, tc = _severity(rng)
    c = _pick(rng, sc.variant, sc.holes, 0.02, 9)
    radius, amp = _lerp(0.05, 0.2, ts), _lerp(0.1, 0.55, tc)
    win = sc.window(c[0], c[1], 2 * radius)
    m = _blob(rng, sc.qx[win], sc.qy[win], c, radius, 0.25)
    rim = 4 * m * (1 - m)  # dried residue collects at the rim (coffee-ring effect)
    sc.lum[win] *= 1 - amp * (0.7 * m + 0.4 * rim)
    k = min(1.0, 2.5 * amp)  # rust/coolant brown, stronger on stronger stains
    sc.tint(win, m, (1 + 0.02 * k, 1 - 0.12 * k, 1 - 0.3 * k))
    return s, win


def _missing_hole(
    sc: _Scene, rng: np.random.Generator, hole: Hole
) -> tuple[float, tuple[slice, slice]]:
    _, _, tc = _severity(rng)  # the hole's size is given; only the mark's contrast varies
    win = sc.window(hole[0], hole[1], hole[2] + 8 * sc.pr)  # bevel and wall shading reach ~8 px
    # Subtle case: a spot-faced blind hole that still looks hole-like; obvious case: bare metal.
    r = _norm(sc.qx[win] - hole[0], sc.qy[win] - hole[1])
    disc = np.clip((hole[2] - r) / (1.5 * sc.pr) + 0.5, 0, 1)
    sc.lum[win] *= 1 - _lerp(0.55, 0.0, tc) * disc
    return tc, win


def _crack(sc: _Scene, rng: np.random.Generator) -> tuple[float, tuple[slice, slice]]:
    s, ts, tc = _severity(rng)
    # Fatigue cracks start at an edge (a hole or the rim) and run into the material.
    c = _pick(rng, sc.variant, sc.holes, 0.004, 0.02)
    e = 1e-3
    gx = _sd_material(sc.variant, sc.holes, np.array([c[0] + e, c[0] - e]), np.array([c[1]] * 2))
    gy = _sd_material(sc.variant, sc.holes, np.array([c[0]] * 2), np.array([c[1] + e, c[1] - e]))
    ang = math.atan2(-(gy[0] - gy[1]), -(gx[0] - gx[1])) + rng.normal(0, 0.3)
    length, width, amp = _lerp(0.1, 0.4, ts), _lerp(1.0, 2.2, ts), _lerp(0.2, 0.7, tc)
    steps = ang + np.cumsum(rng.normal(0, 0.35, 8))
    pts = c + np.cumsum(np.stack([np.cos(steps), np.sin(steps)], 1) * length / 8, 0)
    pts = np.vstack([c - 0.01 * np.array([math.cos(ang), math.sin(ang)]), pts])
    win = sc.window(c[0], c[1], length + 0.03)
    prof = sc.line_profile(_polyline_dist(sc.qx[win], sc.qy[win], pts), width)
    sc.lum[win] *= 1 - amp * np.minimum(prof, 1)
    return s, win


def _nuisance(sc: _Scene, rng: np.random.Generator) -> None:
    """Marks that good parts also carry: an oil spot, a tool mark (fixed draw count)."""
    u = rng.random(2)
    # Nominal holes, not sc.holes: a missing-hole defect must not move the oil spot.
    c = _pick(rng, sc.variant, list(_VARIANTS[sc.variant].holes), 0.02, 9)
    radius, amp, warm = rng.uniform(0.04, 0.12), rng.uniform(0.03, 0.12), rng.uniform(0, 0.5)
    blob_rng = np.random.default_rng(rng.integers(2**63))
    if u[0] < 0.3:  # oil spot: soft-edged, faint, sometimes a little brown like a stain
        win = sc.window(c[0], c[1], 2 * radius)
        m = _blob(blob_rng, sc.qx[win], sc.qy[win], c, radius, 0.8)
        sc.lum[win] *= 1 - amp * m
        sc.tint(win, m, (1.0, 1 - 0.05 * warm, 1 - 0.12 * warm))
    mark_at, mark_amp = rng.uniform(0.05, 0.5), rng.uniform(0.015, 0.05) * rng.choice([-1, 1])
    if u[1] < 0.25:  # tool mark: long and faint, along the machining direction
        turned = _VARIANTS[sc.variant].turned
        coord = _norm(sc.qx, sc.qy) - 0.3 - mark_at / 2 if turned else sc.qy - mark_at
        sc.lum += mark_amp * sc.line_profile(coord, 0.8)


def _dust(rng: np.random.Generator, img: np.ndarray) -> None:
    """Dust specks on a (3, S, S) image, on about a quarter of them (fixed draw count)."""
    u, xy = rng.random(), rng.uniform(0, 1, size=(4, 2))
    radii, amps = rng.uniform(0.4, 1.0, 4), rng.uniform(-0.25, 0.15, 4)
    if u >= 0.25:
        return
    size = img.shape[1]
    for (x, y), r, a in list(zip(xy, radii, amps, strict=True))[: 1 + int(u * 16)]:
        col, row, rr = x * size, y * size, r * size / REFERENCE_SIZE
        r0, r1 = max(int(row - rr - 2), 0), min(int(row + rr + 3), size)
        c0, c1 = max(int(col - rr - 2), 0), min(int(col + rr + 3), size)
        yy, xx = np.mgrid[r0:r1, c0:c1]
        d2 = (xx + 0.5 - col) ** 2 + (yy + 0.5 - row) ** 2
        img[:, r0:r1, c0:c1] *= 1 + a * np.exp(-d2 / (2 * rr * rr))


_DEFECT_DRAW: dict[
    str, Callable[[_Scene, np.random.Generator], tuple[float, tuple[slice, slice]]]
] = {
    "defect_scratch": _scratch,
    "defect_dent": _dent,
    "defect_stain": _stain,
    "defect_crack": _crack,
}


def _jittered(c: LineConditions, z: np.ndarray) -> dict[str, float]:
    """Per-part condition values: nominal plus jitter (z: 8 standard normals, fixed order)."""
    j = c.jitter * z
    values = {
        "lighting": c.lighting * math.exp(0.05 * j[0]),
        "color_temp": float(np.clip(c.color_temp + 150 * j[1], 1500, 15000)),
        "glare": min(1.0, c.glare * math.exp(0.3 * j[2])),
        "focus_blur": max(0.0, c.focus_blur + 0.12 * j[3]),
        "motion_blur": max(0.0, c.motion_blur + 0.25 * j[4]),
        "noise": c.noise * math.exp(0.1 * j[5]),
        "shift": c.shift + 0.75 * j[6],
        "rotation": c.rotation + 3.0 * j[7],
    }
    return {k: float(v) for k, v in values.items()}


def _choose_label(c: LineConditions, u_defect: float, u_type: float) -> str:
    if u_defect >= c.defect_rate:
        return "ok"
    mix = dict(c.defect_mix) if c.defect_mix else dict.fromkeys(DEFECT_TYPES, 1.0)
    weights = np.array([mix.get(d, 0.0) for d in DEFECT_TYPES])
    cum = np.cumsum(weights / weights.sum())
    return DEFECT_TYPES[min(int(np.searchsorted(cum, u_type, side="right")), len(DEFECT_TYPES) - 1)]


def _check_size(image_size: int) -> None:
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(
            f"image_size={image_size} px; accepted: {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}"
        )


@dataclass(frozen=True)
class _Look:
    """Per-part appearance draws that are not line conditions (fixed draw order)."""

    place: np.ndarray  # (2,) where the part landed on the belt, normalised units
    scale: float  # part size tolerance
    tex_ids: np.ndarray  # (4,) texture bank picks: machining, grain, belt, noise
    tex_off: np.ndarray  # (8,) texture offsets
    albedo: float
    tex_amp: float  # strength of machining marks
    metal_tint: np.ndarray  # (3,)
    spec_at: np.ndarray  # (2,) centre of the broad specular lobe, camera frame
    glare_w: float  # glare blob width, normalised units
    belt_phase: float

    @classmethod
    def draw(cls, rng: np.random.Generator, highlight: tuple[float, float]) -> _Look:
        return cls(
            place=rng.normal(0, 0.035, 2),
            scale=float(np.clip(1 + rng.normal(0, 0.025), 0.93, 1.07)),
            tex_ids=rng.integers(0, 4, 4),
            tex_off=rng.integers(0, 1 << 16, 8),
            albedo=float(rng.uniform(0.52, 0.66)),
            tex_amp=float(rng.uniform(0.02, 0.045)),
            metal_tint=(1 + rng.normal(0, 0.008, 3)).astype(np.float32),
            spec_at=np.asarray(highlight) + rng.normal(0, 0.12, 2),
            glare_w=float(rng.uniform(0.1, 0.25)),
            belt_phase=float(rng.random()),
        )


def _gauss1d(coords: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.exp(-((coords - centre) ** 2) / (2 * width * width)).astype(np.float32)


def _shade_metal(
    sc: _Scene, bank: _Bank, look: _Look, d_mat: np.ndarray, facing: np.ndarray
) -> None:
    """Metal luminance: albedo under a broad specular lobe, machining marks, lit bevels."""
    ids, off, px = look.tex_ids, look.tex_off, sc.px
    if _VARIANTS[sc.variant].turned:  # lathe marks are concentric rings
        rings = bank.rings[ids[0]]
        radius = np.sqrt(sc.qx * sc.qx + sc.qy * sc.qy)
        tex = rings[(radius / px + off[0]).astype(np.int32) % rings.size]
    else:  # brushing runs along the part's long axis
        tile = bank.brushed[ids[0]]
        n = tile.shape[0]
        tex = tile[
            (sc.qy / px + off[1]).astype(np.int32) % n, (sc.qx / px + off[0]).astype(np.int32) % n
        ]
    grain = np.roll(bank.grain[ids[1]], (int(off[2]), int(off[3])), axis=(0, 1))
    axis = bank.x[0]  # separable Gaussian: two 1-D exps and an outer product
    lobe = np.outer(_gauss1d(axis, look.spec_at[1], 0.45), _gauss1d(axis, look.spec_at[0], 0.45))
    rim = np.exp(-np.maximum(-d_mat, 0) / (1.6 * sc.pr))
    sc.lum = (
        look.albedo * (0.6 + 0.55 * lobe)
        + look.tex_amp * tex * (0.5 + lobe)
        + 0.012 * grain
        + 0.22 * rim * facing
    ).astype(np.float32)
    if _VARIANTS[sc.variant].turned:  # a turned groove between bore and bolt circle
        sc.lum -= 0.08 * sc.line_profile(radius - 0.36, 1.2)


def _shade_under(
    sc: _Scene, bank: _Bank, look: _Look, d_mat: np.ndarray, d_outer: np.ndarray, facing: np.ndarray
) -> np.ndarray:
    """What shows where there is no metal: the belt in the part's soft shadow; in holes the
    shadowed floor and the bore wall, lit on the side facing the light."""
    off = look.tex_off
    belt = 0.17 + 0.025 * np.roll(
        bank.belt[look.tex_ids[2]], (int(off[4]), int(off[5])), axis=(0, 1)
    )
    belt += 0.01 * np.sin(2 * np.pi * (bank.x * 9 + look.belt_phase))  # belt ribs
    sx = (
        sc.cos * 0.035 + sc.sin * 0.045
    ) / sc.scale  # shadow falls down-right, away from the light
    sy = (sc.cos * 0.045 - sc.sin * 0.035) / sc.scale
    shadow = np.clip(0.5 - _sd_outer(sc.variant, sc.qx - sx, sc.qy - sy) / (8 * sc.pr), 0, 1)
    belt *= 1 - 0.5 * shadow
    outer = np.clip(0.5 - d_outer / sc.px, 0, 1)
    wall = np.exp(-np.maximum(d_mat, 0) / (1.5 * sc.pr))
    hole = 0.5 * belt * (1 - wall) + wall * look.albedo * (0.3 + 0.35 * facing)
    return np.asarray(belt + outer * (hole - belt), np.float32)


def _blur(img: np.ndarray, sigma: float, length: float) -> np.ndarray:
    """Defocus (Gaussian, ``sigma`` px) and horizontal motion smear (``length`` px) of (3, S, S)."""
    gauss = np.ones(1)
    if sigma > 0.05:
        r = max(1, math.ceil(3 * sigma))
        gauss = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    smear = np.ones(1)
    if length > 1e-3:  # box of the given length with fractional end taps
        half = math.ceil(length / 2)
        smear = np.clip(length / 2 + 0.5 - np.abs(np.arange(-half, half + 1)), 0, 1)
    kx, ky = np.convolve(gauss, smear), gauss
    for axis, k in ((1, ky / ky.sum()), (2, kx / kx.sum())):
        if k.size > 1:
            img = _correlate(img, k, axis)
    return img


def _correlate(img: np.ndarray, k: np.ndarray, axis: int) -> np.ndarray:
    """Edge-clamped 1-D correlation along ``axis``.

    Short kernels (the usual slight defocus) as shifted slices: twice as fast as ndimage here.
    Deliberately no BLAS (a banded matrix product is faster on an idle machine, but OpenBLAS
    threads collapse to a tenth of the speed when the cores are shared).
    """
    if k.size > 7:
        return np.asarray(ndimage.correlate1d(img, k, axis=axis, mode="nearest"))
    r, n = k.size // 2, img.shape[axis]
    pad = [(0, 0)] * img.ndim
    pad[axis] = (r, r)
    padded = np.pad(img, pad, mode="edge")
    out = np.zeros_like(img)
    for t, w in enumerate(k):
        window = [slice(None)] * img.ndim
        window[axis] = slice(t, t + n)
        out += float(w) * padded[tuple(window)]
    return out


def generate_part(
    rng_seed: int,
    conditions: LineConditions,
    image_size: int,
    label: str | None = None,
    *,
    part_id: str | None = None,
) -> tuple[np.ndarray, PartRecord]:
    """Render one part as an ``(image_size, image_size, 3)`` uint8 RGB image.

    ``label`` forces the class (one of :data:`CLASSES`); ``None`` draws it from
    ``conditions.defect_rate`` and ``defect_mix``. Forcing a label or changing a condition leaves
    every other random choice unchanged, so the same part can be compared across them.
    """
    _check_size(image_size)
    if rng_seed < 0:
        raise ValueError(f"rng_seed must be >= 0; got {rng_seed}")
    if label is not None and label not in CLASSES:
        raise ValueError(f"label {label!r} is not a class; accepted: {', '.join(CLASSES)}")
    size, bank = image_size, _bank(image_size)
    u = np.random.default_rng([rng_seed, 0]).random(4)
    label = label or _choose_label(conditions, float(u[0]), float(u[1]))
    variant = conditions.variant if conditions.variant != "mix" else VARIANTS[int(u[2] * 3)]
    camera = conditions.camera if conditions.camera != "mix" else CAMERAS[int(u[3] * 2)]
    cam_gain, cam_tint, highlight = _CAMERA_LIGHT[camera]
    geo = np.random.default_rng([rng_seed, 1])
    applied = _jittered(conditions, geo.standard_normal(8))
    look = _Look.draw(geo, highlight)

    # Pose: camera shift and rotation plus where the part landed; q = part frame of each pixel.
    theta = math.radians(applied["rotation"])
    cos, sin, scale = math.cos(theta), math.sin(theta), look.scale
    offset = applied["shift"] / (REFERENCE_SIZE / 2) / math.sqrt(2)  # px -> normalised, diagonal
    cx, cy = offset + float(look.place[0]), offset + float(look.place[1])
    dx, dy = bank.x - cx, bank.y - cy
    qx, qy = (cos * dx + sin * dy) / scale, (cos * dy - sin * dx) / scale
    lx, ly = _LIGHT_DIR
    light = np.array([cos * lx + sin * ly, cos * ly - sin * lx])
    spec = _VARIANTS[variant]
    sc = _Scene(size, variant, list(spec.holes), qx, qy, cos, sin, scale, cx, cy, light)
    glare_q = _pick(geo, variant, sc.holes, 0.0, 9)  # reflections show where the metal is
    glare_at = (
        scale * (cos * glare_q[0] - sin * glare_q[1]) + cx,
        scale * (sin * glare_q[0] + cos * glare_q[1]) + cy,
    )

    # Defect draws come from a stream per type, so forcing a label changes only the defect.
    defect_rng = np.random.default_rng([rng_seed, 3 + CLASSES.index(label)])
    missing: Hole | None = None
    if label == "defect_missing_hole":
        missing = sc.holes.pop(spec.omittable[int(defect_rng.integers(len(spec.omittable)))])

    # Geometry: signed distances (part units) give coverage, bevel normals and hole walls.
    d_outer = _sd_outer(variant, qx, qy)
    d_mat = np.maximum(d_outer, -sc.hole_field())
    alpha = np.clip(0.5 - d_mat / sc.px, 0, 1)
    gy, gx = np.gradient(d_mat)
    facing = (gx * lx + gy * ly) / (np.sqrt(gx * gx + gy * gy) + 1e-9)
    _shade_metal(sc, bank, look, d_mat, facing)

    severity: float | None = None
    box: tuple[int, int, int, int] | None = None
    _nuisance(sc, np.random.default_rng([rng_seed, 2]))
    if label != "ok":
        if missing is not None:
            severity, win = _missing_hole(sc, defect_rng, missing)
        else:
            severity, win = _DEFECT_DRAW[label](sc, defect_rng)
        box = (win[1].start, win[0].start, win[1].stop, win[0].stop)

    # Compose channel-first (3, S, S): broadcasting over the leading axis is the fast one.
    under = _shade_under(sc, bank, look, d_mat, d_outer, facing)
    metal = look.metal_tint[:, None, None] * sc.lum
    if sc.chroma is not None:
        metal *= sc.chroma
    under3 = (
        _BELT_TINT[:, None, None]
        * (1 + 0.02 * ((zlib.crc32(conditions.line.encode()) % 5) - 2))
        * under
    )
    img = (under3 + alpha * (metal - under3)).astype(np.float32)
    _dust(np.random.default_rng([rng_seed, 9]), img)

    # Light: glare blob (strongest on the metal), gain, colour, vignetting; then optics and sensor.
    axis = bank.x[0]
    blob = np.outer(
        _gauss1d(axis, glare_at[1], look.glare_w), _gauss1d(axis, glare_at[0], look.glare_w)
    )
    img += 1.2 * applied["glare"] * blob * (0.25 + 0.75 * alpha)
    color = (
        applied["lighting"] * cam_gain * _kelvin_rgb(applied["color_temp"]) * np.asarray(cam_tint)
    )
    img *= (255 * color).astype(np.float32)[:, None, None] * bank.vignette
    k = size / REFERENCE_SIZE
    img = _blur(img, applied["focus_blur"] * k, applied["motion_blur"] * k)
    if applied["noise"] > 0 and bank.noise:
        tile = bank.noise[int(look.tex_ids[3])]
        oy, ox = int(look.tex_off[6]) % size, int(look.tex_off[7]) % size
        img += applied["noise"] * tile[:, oy : oy + size, ox : ox + size]
    elif applied["noise"] > 0:
        fresh = np.random.default_rng([rng_seed, 10]).standard_normal(img.shape, np.float32)
        img += applied["noise"] * fresh
    image = np.clip(img + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0)

    record = PartRecord(
        part_id=part_id or f"{conditions.line}-{rng_seed:x}",
        label=label,
        line=conditions.line,
        camera=camera,
        variant=variant,
        seed=rng_seed,
        conditions=applied,
        defect_severity=severity,
        defect_box=box,
    )
    return np.ascontiguousarray(image), record


def part_seed(seed: int, k: int) -> int:
    """Seed of part ``k`` of a stream: a function of ``(seed, k)`` only, spread over 63 bits."""
    return int(np.random.SeedSequence([seed, k]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def iter_parts(
    n: int, seed: int, conditions: LineConditions, image_size: int, start: int = 0
) -> Iterator[tuple[np.ndarray, PartRecord]]:
    """Yield parts ``start .. start+n-1`` of stream ``seed``; part k never depends on ``start``."""
    if seed < 0 or start < 0 or n < 0:
        raise ValueError(f"seed, start and n must be >= 0; got seed={seed} start={start} n={n}")
    for k in range(start, start + n):
        yield generate_part(
            part_seed(seed, k), conditions, image_size, part_id=f"{conditions.line}-{seed}-{k:06d}"
        )


# ---------------------------------------------------------------------------------------------
# Datasets on disk.
# ---------------------------------------------------------------------------------------------

ProgressCallback = Callable[[int, int], None]  # (parts done, parts total)


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MARKER_NAME).is_file():
        raise ValueError(
            f"output folder {out_dir} is not empty and is not a previous 'kensa line' output; "
            "choose an empty or new folder"
        )


def generate_dataset(
    out_dir: str | Path,
    n: int,
    seed: int,
    image_size: int = 128,
    conditions: LineConditions | None = None,
    progress: ProgressCallback | None = None,
) -> Path:
    """Write ``n`` parts as an ImageFolder dataset plus ``manifest.csv``; return the manifest path.

    Layout: ``out_dir/<label>/<part_id>.png`` (only classes that occur get a folder). Manifest
    columns: :data:`MANIFEST_COLUMNS`. Same arguments give byte-identical files. The dataset is
    built in a temporary sibling folder and renamed into place, so a failure leaves no half
    dataset; a previous output in ``out_dir`` is replaced, anything else there is refused.
    """
    out_dir = Path(out_dir)
    conditions = conditions or LineConditions()
    if n < 1:
        raise ValueError(f"n={n}; need at least 1 part")
    if seed < 0:
        raise ValueError(f"seed={seed}; need a seed >= 0")
    _check_size(image_size)
    _check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        rows = []
        for done, (image, rec) in enumerate(iter_parts(n, seed, conditions, image_size), start=1):
            rel = f"{rec.label}/{rec.part_id}.png"
            (tmp / rec.label).mkdir(exist_ok=True)
            (tmp / rel).write_bytes(encode_png(image))
            rows.append(rec.manifest_row(rel))
            if progress is not None:
                progress(done, n)
        with (tmp / MANIFEST_NAME).open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        marker = {
            "generator": "kensa.synthetic",
            "version": GENERATOR_VERSION,
            "seed": seed,
            "n": n,
            "image_size": image_size,
            "conditions": conditions.as_dict(),
        }
        (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / MANIFEST_NAME


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 image: "up" row filter, zlib level 1, no metadata.

    Four times faster than Pillow's adaptive encoder at the same size (sensor noise barely
    compresses further), and the bytes depend only on the pixels.
    """
    h, w, _ = image.shape
    rows = np.ascontiguousarray(image).reshape(h, w * 3)
    raw = np.empty((h, w * 3 + 1), np.uint8)
    raw[:, 0] = 2  # filter type "up": each row minus the row above (uint8 wrap-around)
    raw[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 1))
        + chunk(b"IEND", b"")
    )


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    _check_out_dir(out_dir)  # again: someone may have written there while we generated
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        out_dir.rename(old / "data")
    try:
        tmp.rename(out_dir)
    except OSError:
        if old is not None:
            (old / "data").rename(out_dir)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def read_manifest(path: str | Path) -> list[dict[str, str]]:
    """Rows of a manifest.csv written by :func:`generate_dataset`."""
    with Path(path).open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------------------------------------
# Sample sheets for people (docs, reviews).
# ---------------------------------------------------------------------------------------------


def save_sample_sheets(
    out_dir: str | Path, seed: int = 0, image_size: int = 128, per_class: int = 6
) -> tuple[Path, Path]:
    """Save ``samples_by_class.png`` and ``samples_by_condition.png`` into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    _check_size(image_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = LineConditions()

    fig, axes = plt.subplots(
        len(CLASSES), per_class, figsize=(1.6 * per_class, 1.75 * len(CLASSES))
    )
    for r, cls in enumerate(CLASSES):
        for c in range(per_class):  # columns cycle through variants and cameras
            shown = base.with_overrides({"variant": VARIANTS[c % 3], "camera": CAMERAS[c // 3 % 2]})
            image, rec = generate_part(part_seed(seed, 100 * r + c), shown, image_size, label=cls)
            ax = axes[r, c]
            ax.imshow(image)
            sev = "" if rec.defect_severity is None else f" sev {rec.defect_severity:.2f}"
            ax.set_title(f"{rec.variant}/{rec.camera}{sev}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(cls, fontsize=8)
    fig.suptitle(f"Synthetic line: a row per class (seed {seed}, {image_size} px)", fontsize=11)
    fig.tight_layout()
    by_class = out / "samples_by_class.png"
    fig.savefig(by_class, dpi=110)
    plt.close(fig)

    # One part, good and with a clear crack, swept through every condition (no jitter).
    still = base.with_overrides({"jitter": 0.0, "variant": "A", "camera": "C1"})

    def crack_visibility(part: int) -> int:  # grey-level change the crack makes, at 64 px
        cracked, ok = (generate_part(part, still, 64, lab)[0] for lab in ("defect_crack", "ok"))
        return int(np.abs(cracked.astype(np.int32) - ok).sum())

    subject = max((part_seed(seed, 1000 + i) for i in range(30)), key=crack_visibility)
    subjects = [(subject, "ok"), (subject, "defect_crack")]
    steps = len(next(iter(CONDITION_SWEEPS.values())))
    cols = steps * len(subjects)
    fig, axes = plt.subplots(
        len(CONDITION_SWEEPS), cols, figsize=(1.25 * cols, 1.45 * len(CONDITION_SWEEPS))
    )
    for r, (name, values) in enumerate(CONDITION_SWEEPS.items()):
        for s_i, (s_seed, s_label) in enumerate(subjects):
            for v_i, value in enumerate(values):
                image, _ = generate_part(
                    s_seed, still.with_overrides({name: value}), image_size, s_label
                )
                ax = axes[r, s_i * steps + v_i]
                ax.imshow(image)
                ax.set_title(f"{s_label.removeprefix('defect_')} {name}={value:g}", fontsize=6)
                ax.set_xticks([])
                ax.set_yticks([])
                if s_i == 0 and v_i == 0:
                    ax.set_ylabel(name, fontsize=8)
    fig.suptitle(
        f"Synthetic line: one part, good (left) and cracked (right), under each condition "
        f"(seed {seed}, {image_size} px)",
        fontsize=11,
    )
    fig.tight_layout()
    by_condition = out / "samples_by_condition.png"
    fig.savefig(by_condition, dpi=110)
    plt.close(fig)
    return by_class, by_condition
