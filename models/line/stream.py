"""A simulated line stream: parts ``0..n-1`` of a seeded line, one condition shifted from part K on.

Pure generation, no HTTP: ``kensa line stream`` (``kensa/cli/stream.py``) sends these parts to a
running service, and the drift benchmark and tests read the same stream. Part ``k`` depends only
on ``(seed, k)`` and the conditions in force for it, so the parts before the shift are
byte-identical to those of a stream without one, and each shifted part is the same physical part
seen under the new condition.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from kensa.models.line.conditions import CAMERAS, DEFECT_TYPES, LineConditions, PartRecord, _check_size
from kensa.models.line.dataset import encode_png
from kensa.models.line.render import generate_part, part_seed

# Shift names a user types, mapped to the line condition each one changes. Several names say the
# same thing the way people say it on the shop floor ("colour temperature", "camera shift").
SHIFT_CONDITIONS: dict[str, str] = {
    "lighting": "lighting",
    "color_temp": "color_temp",
    "colour_temp": "color_temp",
    "colour_temperature": "color_temp",
    "color_temperature": "color_temp",
    "glare": "glare",
    "blur": "focus_blur",
    "focus_blur": "focus_blur",
    "motion_blur": "motion_blur",
    "noise": "noise",
    "camera_shift": "shift",
    "shift": "shift",
    "rotation": "rotation",
    "variant": "variant",
    "defect_rate": "defect_rate",
    "class_mix": "defect_rate",
    "defect_mix": "defect_mix",
    "new_defect": "defect_mix",
    "defect_type": "defect_mix",
}
# Shifts whose value names one defect type: every defective part becomes that type.
_ONE_DEFECT = ("new_defect", "defect_type")
_TYPES = ", ".join(d.removeprefix("defect_") for d in DEFECT_TYPES)


def accepted_shifts() -> str:
    """The shift names, with what each changes, for error messages and ``--help``."""
    return ", ".join(
        name if name == cond else f"{name} (= {cond})" for name, cond in SHIFT_CONDITIONS.items()
    )


def parse_shifts(items: Iterable[str] | Mapping[str, object]) -> dict[str, object]:
    """``["lighting=0.6", "blur=2"]`` → condition overrides ``{"lighting": "0.6", ...}``.

    Raises ``ValueError`` naming a bad item and listing the accepted shift names. Values are
    checked later, by :class:`LineConditions`, which names the accepted range.
    """
    pairs: Iterable[tuple[str, object]] = (
        items.items() if isinstance(items, Mapping) else (_split(item) for item in items)
    )
    out: dict[str, object] = {}
    for name, value in pairs:
        key = name.strip().lower().replace("-", "_")
        condition = SHIFT_CONDITIONS.get(key)
        if condition is None:
            raise ValueError(f"unknown shift {name!r}; accepted shifts: {accepted_shifts()}")
        if condition in out:
            raise ValueError(f"shift {name!r} changes {condition}, which is already shifted")
        if key in _ONE_DEFECT:
            kind = str(value).strip().removeprefix("defect_")
            if f"defect_{kind}" not in DEFECT_TYPES:
                raise ValueError(f"shift {name}={value!r}: not a defect type; accepted: {_TYPES}")
            value = f"{kind}:1"
        out[condition] = value
    return out


def _split(item: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise ValueError(
            f"shift {item!r} is not of the form name=value (e.g. lighting=0.6); "
            f"accepted shifts: {accepted_shifts()}"
        )
    return name, value.strip()


@dataclass(frozen=True)
class StreamPlan:
    """What to send: ``n`` parts of line ``seed``, shifted from part ``shift_at`` on.

    ``camera`` is the synthetic camera to render (``C1``, ``C2``) or ``None`` for each part's own
    (the line's mix). ``shift`` holds condition overrides (from :func:`parse_shifts`).
    """

    n: int
    seed: int = 0
    image_size: int = 64
    line: str = "L1"
    camera: str | None = None
    shift: Mapping[str, object] = field(default_factory=dict)
    shift_at: int = 0
    base: LineConditions = field(default_factory=LineConditions)

    def __post_init__(self) -> None:
        if self.n < 0 or self.seed < 0 or self.shift_at < 0:
            raise ValueError(
                f"n, seed and shift_at must be >= 0; got n={self.n} seed={self.seed} shift_at={self.shift_at}"
            )
        _check_size(self.image_size)
        if self.camera is not None and self.camera not in CAMERAS:
            raise ValueError(f"camera {self.camera!r}; accepted: {', '.join(CAMERAS)}")
        # Built once here so a bad value fails before anything is sent.
        self.conditions(shifted=True)

    def conditions(self, shifted: bool) -> LineConditions:
        """The line's conditions before (``False``) or from (``True``) the shift."""
        fixed: dict[str, object] = {"line": self.line, "camera": self.camera or "mix"}
        nominal = self.base.with_overrides(fixed)
        return nominal.with_overrides(dict(self.shift)) if shifted and self.shift else nominal

    def is_shifted(self, k: int) -> bool:
        return bool(self.shift) and k >= self.shift_at

    def describe(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "seed": self.seed,
            "image_size": self.image_size,
            "line": self.line,
            "camera": self.camera,
            "shift": {k: str(v) for k, v in self.shift.items()},
            "shift_at": self.shift_at if self.shift else None,
        }


@dataclass(frozen=True)
class StreamPart:
    """One part of the stream: its index, PNG bytes and what the line knows about it."""

    index: int
    part_id: str
    png: bytes
    record: PartRecord
    shifted: bool

    @property
    def label(self) -> str:
        return self.record.label

    @property
    def camera(self) -> str:
        return self.record.camera


def render_part(plan: StreamPlan, k: int, pre: LineConditions, post: LineConditions) -> StreamPart:
    shifted = plan.is_shifted(k)
    part_id = f"{plan.line}-{plan.seed}-{k:06d}"
    image, record = generate_part(
        part_seed(plan.seed, k), post if shifted else pre, plan.image_size, part_id=part_id
    )
    return StreamPart(k, part_id, encode_png(image), record, shifted)


def iter_stream(plan: StreamPlan, start: int = 0) -> Iterator[StreamPart]:
    """Parts ``start .. n-1`` of the plan, in order (part k never depends on ``start``)."""
    pre, post = plan.conditions(shifted=False), plan.conditions(shifted=True)
    for k in range(start, plan.n):
        yield render_part(plan, k, pre, post)
