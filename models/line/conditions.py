"""Line conditions (:class:`LineConditions`), their parsing and checks, and :class:`PartRecord`."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

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
    "mask",  # the defect mask's path (empty for good parts)
    *CONDITION_COLUMNS,
)
MANIFEST_NAME = "manifest.csv"
MARKER_NAME = ".kensa-line.json"  # marks a folder as our output, so re-generating may replace it
GENERATOR_VERSION = 2  # 2: defect masks (.masks/, manifest column "mask")
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 1024
REFERENCE_SIZE = 128  # "px" parameters are pixels at this image size
# A pixel belongs to a defect's mask where the mark changed the surface's brightness by more than
# this fraction: below it the mark is invisible under the line's noise at any setting.
MASK_CONTRAST = 0.03
MASKS_DIR = ".masks"  # <dataset>/.masks/<part_id>.png; hidden, so no loader takes it for a class

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
                raise ValueError(f"condition {name}={value} is outside the accepted range {lo}..{hi}")
        if self.variant not in (*VARIANTS, "mix"):
            raise ValueError(f"condition variant={self.variant!r}; accepted: {', '.join(VARIANTS)}, mix")
        if self.camera not in (*CAMERAS, "mix"):
            raise ValueError(f"condition camera={self.camera!r}; accepted: {', '.join(CAMERAS)}, mix")
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
    ``defect_mask`` is the defect's pixels, ``(S, S)`` bool, where the mark changed the surface
    by more than :data:`MASK_CONTRAST` (for a missing hole: where the hole should be); it is what
    pixel-level metrics of anomaly maps are measured against.
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
    defect_mask: np.ndarray | None = field(default=None, repr=False, compare=False)

    def manifest_row(self, path: str, mask: str = "") -> dict[str, str]:
        """One manifest.csv row; ``path`` and ``mask`` are relative to the dataset folder."""
        row = {
            "path": path,
            "label": self.label,
            "part_id": self.part_id,
            "line": self.line,
            "camera": self.camera,
            "variant": self.variant,
            "mask": mask,
        }
        row.update({k: _fmt(self.conditions[k]) for k in CONDITION_COLUMNS})
        return row


def _fmt(value: float) -> str:
    # Fixed precision keeps manifest bytes identical across runs and platforms.
    return f"{value:.4f}".rstrip("0").rstrip(".") if value != 0 else "0"


def _check_size(image_size: int) -> None:
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size={image_size} px; accepted: {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}")
