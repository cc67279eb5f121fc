"""Rendering one part: per-part jitter and looks, shading, defects, light, optics and sensor.

Determinism: every random draw comes from ``numpy`` generators seeded by ``(part seed, stream)``;
the draws never depend on the condition values or on the forced label, so the same part can be
re-rendered under other conditions or with another defect and only that one thing changes.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from kensa.models.line.conditions import (
    CAMERAS,
    CLASSES,
    DEFECT_TYPES,
    MASK_CONTRAST,
    REFERENCE_SIZE,
    VARIANTS,
    LineConditions,
    PartRecord,
    _check_size,
)
from kensa.models.line.defects import _DEFECT_DRAW, _dust, _missing_hole, _nuisance
from kensa.models.line.optics import (
    _BELT_TINT,
    _CAMERA_LIGHT,
    _LIGHT_DIR,
    _Bank,
    _bank,
    _blur,
    _gauss1d,
    _kelvin_rgb,
)
from kensa.models.line.scene import _VARIANTS, Hole, _pick, _Scene, _sd_outer


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


def _shade_metal(sc: _Scene, bank: _Bank, look: _Look, d_mat: np.ndarray, facing: np.ndarray) -> None:
    """Metal luminance: albedo under a broad specular lobe, machining marks, lit bevels."""
    ids, off, px = look.tex_ids, look.tex_off, sc.px
    if _VARIANTS[sc.variant].turned:  # lathe marks are concentric rings
        rings = bank.rings[ids[0]]
        radius = np.sqrt(sc.qx * sc.qx + sc.qy * sc.qy)
        tex = rings[(radius / px + off[0]).astype(np.int32) % rings.size]
    else:  # brushing runs along the part's long axis
        tile = bank.brushed[ids[0]]
        n = tile.shape[0]
        tex = tile[(sc.qy / px + off[1]).astype(np.int32) % n, (sc.qx / px + off[0]).astype(np.int32) % n]
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
    belt = 0.17 + 0.025 * np.roll(bank.belt[look.tex_ids[2]], (int(off[4]), int(off[5])), axis=(0, 1))
    belt += 0.01 * np.sin(2 * np.pi * (bank.x * 9 + look.belt_phase))  # belt ribs
    sx = (sc.cos * 0.035 + sc.sin * 0.045) / sc.scale  # shadow falls down-right, away from the light
    sy = (sc.cos * 0.045 - sc.sin * 0.035) / sc.scale
    shadow = np.clip(0.5 - _sd_outer(sc.variant, sc.qx - sx, sc.qy - sy) / (8 * sc.pr), 0, 1)
    belt *= 1 - 0.5 * shadow
    outer = np.clip(0.5 - d_outer / sc.px, 0, 1)
    wall = np.exp(-np.maximum(d_mat, 0) / (1.5 * sc.pr))
    hole = 0.5 * belt * (1 - wall) + wall * look.albedo * (0.3 + 0.35 * facing)
    return np.asarray(belt + outer * (hole - belt), np.float32)


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
    mask: np.ndarray | None = None
    if label != "ok":
        before = sc.lum.copy()
        if missing is not None:
            severity, win = _missing_hole(sc, defect_rng, missing)
            # The defect is the hole that is not there, whether or not the spot looks different.
            mask = np.hypot(qx - missing[0], qy - missing[1]) < missing[2]
        else:
            severity, win = _DEFECT_DRAW[label](sc, defect_rng)
            mask = np.abs(sc.lum - before) > MASK_CONTRAST * np.maximum(np.abs(before), 0.05)
        box = (win[1].start, win[0].start, win[1].stop, win[0].stop)

    # Compose channel-first (3, S, S): broadcasting over the leading axis is the fast one.
    under = _shade_under(sc, bank, look, d_mat, d_outer, facing)
    metal = look.metal_tint[:, None, None] * sc.lum
    if sc.chroma is not None:
        metal *= sc.chroma
    under3 = _BELT_TINT[:, None, None] * (1 + 0.02 * ((zlib.crc32(conditions.line.encode()) % 5) - 2)) * under
    img = (under3 + alpha * (metal - under3)).astype(np.float32)
    _dust(np.random.default_rng([rng_seed, 9]), img)

    # Light: glare blob (strongest on the metal), gain, colour, vignetting; then optics and sensor.
    axis = bank.x[0]
    blob = np.outer(_gauss1d(axis, glare_at[1], look.glare_w), _gauss1d(axis, glare_at[0], look.glare_w))
    img += 1.2 * applied["glare"] * blob * (0.25 + 0.75 * alpha)
    color = applied["lighting"] * cam_gain * _kelvin_rgb(applied["color_temp"]) * np.asarray(cam_tint)
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
        defect_mask=None if mask is None else mask & (alpha > 0.5),
    )
    return np.ascontiguousarray(image), record


def part_seed(seed: int, k: int) -> int:
    """Seed of part ``k`` of a stream: a function of ``(seed, k)`` only, spread over 63 bits."""
    return int(np.random.SeedSequence([seed, k]).generate_state(1, np.uint64)[0] >> np.uint64(1))
