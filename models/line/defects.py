"""Marks drawn onto a scene: the five defect types, nuisance marks on good parts, and dust."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from kensa.models.line.conditions import REFERENCE_SIZE
from kensa.models.line.scene import _VARIANTS, Hole, _norm, _pick, _polyline_dist, _Scene, _sd_material


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


def _missing_hole(sc: _Scene, rng: np.random.Generator, hole: Hole) -> tuple[float, tuple[slice, slice]]:
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


_DEFECT_DRAW: dict[str, Callable[[_Scene, np.random.Generator], tuple[float, tuple[slice, slice]]]] = {
    "defect_scratch": _scratch,
    "defect_dent": _dent,
    "defect_stain": _stain,
    "defect_crack": _crack,
}
