"""Part geometry (variants, signed distances) and the scene one part is drawn in."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kensa.models.line.conditions import REFERENCE_SIZE

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
        + tuple((0.5 * math.cos(a * math.pi / 3), 0.5 * math.sin(a * math.pi / 3), 0.06) for a in range(6)),
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
# The scene: one part's pose, geometry and the metal luminance that defects edit.
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
        self.chroma[:, win[0], win[1]] *= 1 + mask * (np.asarray(rgb, np.float32) - 1)[:, None, None]


def _pick(rng: np.random.Generator, variant: str, holes: list[Hole], lo: float, hi: float) -> np.ndarray:
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
