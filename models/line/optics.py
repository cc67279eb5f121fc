"""Light and lens: cached per-size texture banks, light colour, camera lighting and blur."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from kensa.models.line.conditions import REFERENCE_SIZE

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
        fine = norm(ndimage.gaussian_filter(rng.standard_normal((size, size)), 0.7 * k, mode="wrap"))
        coarse = norm(ndimage.gaussian_filter(rng.standard_normal((size, size)), 6 * k, mode="wrap"))
        belt.append(norm(fine + 0.6 * coarse))
        if size <= _NOISE_TILE_MAX:
            sensor.append(rng.standard_normal((3, 2 * size, 2 * size), dtype=np.float32))
    return _Bank(x, y, vignette, tuple(brushed), tuple(rings), tuple(grain), tuple(belt), tuple(sensor))


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
        b = 255.0 if t >= 66 else (0.0 if t <= 19 else 138.5177312231 * math.log(t - 10) - 305.0447927307)
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


def _gauss1d(coords: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.exp(-((coords - centre) ** 2) / (2 * width * width)).astype(np.float32)


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
