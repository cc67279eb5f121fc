"""Shop-floor image corruptions: lighting, optics, sensor, link, dust, fixture; 5 severities."""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as F

__all__ = [
    "CORRUPTIONS",
    "SEVERITIES",
    "Corruption",
    "apply_corruption",
    "corruption_names",
    "get_corruption",
]

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

# Optical sizes (blur sigma, streak length) are specified at this short-side resolution and scaled
# with the actual image, so the same severity means the same optics at any model input size.
_REF_SIDE = 224.0
# The camera is assumed to be white-balanced for this lamp colour temperature (daylight LED).
_REF_KELVIN = 6500.0
# Display gamma: exposure changes act on linear light, pixel values are gamma-encoded (sRGB-like).
_GAMMA = 2.2

# A kernel takes a uint8 batch (N, 3, H, W), the physical parameters of one severity and the seed,
# and returns a uint8 batch of the same shape.
Kernel = Callable[[torch.Tensor, Mapping[str, float], int], torch.Tensor]


@dataclass(frozen=True, eq=False)
class Corruption:
    """One corruption type: what it models, its physical parameter per severity, and its kernel."""

    name: str
    description: str
    parameter: str  # the physical parameter(s) and units, for reports
    levels: tuple[Mapping[str, float], ...]  # one entry per severity 1..5
    kernel: Kernel

    def level(self, severity: int) -> dict[str, float]:
        """The physical parameters used at `severity` (1..5)."""
        _check_severity(severity)
        return dict(self.levels[severity - 1])

    def describe(self, severity: int) -> str:
        """One line for a report, e.g. ``dim s3: ev=-1.5``."""
        params = ", ".join(f"{k}={v:g}" for k, v in self.level(severity).items())
        return f"{self.name} s{severity}: {params}"

    def apply(self, images: torch.Tensor, severity: int, seed: int = 0) -> torch.Tensor:
        """Corrupt uint8 images (N,3,H,W) or (3,H,W); same dtype, shape and device out."""
        _check_severity(severity)
        _check_seed(seed)
        batch = _as_batch(images)
        out = self.kernel(batch, self.levels[int(severity) - 1], int(seed))
        return out if images.ndim == 4 else out[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary for reports and MLflow artifacts."""
        return {
            "name": self.name,
            "description": self.description,
            "parameter": self.parameter,
            "levels": {str(s): dict(lv) for s, lv in zip(SEVERITIES, self.levels, strict=True)},
        }


# ---------------------------------------------------------------------------- validation helpers


def _check_severity(severity: int) -> None:
    if isinstance(severity, bool) or not isinstance(severity, numbers.Integral) or severity not in SEVERITIES:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _as_batch(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (0..255), got dtype {images.dtype}")
    if images.ndim not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"images must have shape (3, H, W) or (N, 3, H, W), got {tuple(images.shape)}")
    return images if images.ndim == 4 else images.unsqueeze(0)


# ---------------------------------------------------------------------------- shared helpers


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round().clamp(0, 255).to(torch.uint8)


def _short_side(batch: torch.Tensor) -> int:
    return min(int(batch.shape[-2]), int(batch.shape[-1]))


def _rng(seed: int, salt: str) -> np.random.Generator:
    # The salt decorrelates corruption types: dust and glare from the same seed land in different
    # places. Static geometry (dust on the window, the lamp's reflection, a knocked fixture) is the
    # same for every frame, as on a real line, so it depends on the seed only.
    salt_int = int.from_bytes(hashlib.blake2b(salt.encode(), digest_size=4).digest(), "little")
    return np.random.default_rng([seed, salt_int])


def _frame_generator(seed: int, image: torch.Tensor) -> torch.Generator:
    # Sensor noise is different in every frame, yet must not depend on the batch the frame came
    # in (batch[i] == single image i). Seeding from (seed, image content) gives both.
    h = hashlib.blake2b(digest_size=8)
    h.update(seed.to_bytes(8, "little"))
    h.update(image.detach().contiguous().cpu().numpy().tobytes())
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(h.digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return gen


def _grid(h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ys = torch.arange(h, dtype=torch.float32, device=device).view(h, 1)
    xs = torch.arange(w, dtype=torch.float32, device=device).view(1, w)
    return ys, xs


def _blend(batch: torch.Tensor, alpha: torch.Tensor, target: torch.Tensor | float) -> torch.Tensor:
    # alpha: (H, W) in [0, 1]; out = (1 - alpha) * image + alpha * target.
    x = batch.float()
    return _to_uint8(x + alpha * (target - x))


# ---------------------------------------------------------------------------- lighting


def _exposure(batch: torch.Tensor, p: Mapping[str, float], seed: int) -> torch.Tensor:
    # A change of `ev` stops scales linear light by 2**ev; on gamma-encoded pixels that is a gain of
    # 2**(ev / gamma). Clipping at 255 is the overexposure (burnt-out highlights) on the way up.
    return F.adjust_brightness(batch, 2.0 ** (p["ev"] / _GAMMA))


def _kelvin_to_rgb(kelvin: float) -> np.ndarray:
    # Tanner Helland's fit of blackbody colour (valid 1000..40000 K), RGB in 0..255.
    t = kelvin / 100.0
    r = 255.0 if t <= 66 else 329.698727446 * (t - 60) ** -0.1332047592
    g = (
        99.4708025861 * math.log(t) - 161.1195681661
        if t <= 66
        else 288.1221695283 * (t - 60) ** -0.0755148492
    )
    if t >= 66:
        b = 255.0
    elif t <= 19:
        b = 0.0
    else:
        b = 138.5177312231 * math.log(t - 10) - 305.0447927307
    return np.clip(np.array([r, g, b]), 1.0, 255.0)


def _color_temp(batch: torch.Tensor, p: Mapping[str, float], seed: int) -> torch.Tensor:
    # The lamp drifts to a warmer colour while the camera keeps its fixed white balance: each
    # channel gets gain rgb(T) / rgb(T_ref), renormalised to keep luminance (Rec.601 weights), so
    # the picture turns orange without getting darker. R/B grows monotonically as T drops.
    gains = _kelvin_to_rgb(p["kelvin"]) / _kelvin_to_rgb(_REF_KELVIN)
    gains /= float(np.dot(gains, [0.299, 0.587, 0.114]))
    g = torch.tensor(gains, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    return _to_uint8(batch.float() * g)


def _glare(batch: torch.Tensor, p: Mapping[str, float], seed: int) -> torch.Tensor:
    # A specular reflection of the lamp: a Gaussian blob blended towards white, whose peak opacity
    # exceeds 1 at high severity so its core is saturated (255, no texture left). The position is
    # fixed by the seed (lamp and part geometry do not change between frames).
    h, w = int(batch.shape[-2]), int(batch.shape[-1])
    cy, cx = _rng(seed, "glare").uniform(0.25, 0.75, size=2) * np.array([h, w])
    sigma = p["radius_frac"] * _short_side(batch)
    ys, xs = _grid(h, w, batch.device)
    d2 = (ys - float(cy)) ** 2 + (xs - float(cx)) ** 2
    alpha = (p["peak"] * torch.exp(-d2 / (2 * sigma**2))).clamp(0, 1)
    return _blend(batch, alpha, 255.0)


# ---------------------------------------------------------------------------- optics


def _focus_blur(batch: torch.Tensor, p: Mapping[str, float], seed: int) -> torch.Tensor:
    # Defocus approximated by a Gaussian point-spread function; kernel covers +-3 sigma.
    sigma = p["sigma_px_at_224"] * _short_side(batch) / _REF_SIDE
    k = 2 * math.ceil(3 * sigma) + 1
    return F.gaussian_blur(batch, [k, k], [sigma, sigma])


def _motion_blur(batch: torch.Tensor, p: Mapping[str, float], seed: int) -> torch.Tensor:
    # The part moves along the conveyor (image x axis) during the exposure: a horizontal box PSF of
    # `length` px. Fractional lengths get partial end taps so the blur grows continuously.
    length = max(p["length_px_at_224"] * _short_side(batch) / _REF_SIDE, 1.0)
    half = math.ceil(length / 2)
    taps = torch.arange(-half, half + 1, dtype=torch.float32)
    weights = (length / 2 - taps.abs() + 0.5).clamp(0, 1)
    weights = (weights / weights.sum()).to(batch.device)
    kernel = weights.view(1, 1, 1, -1).repeat(3, 1, 1, 1)  # (C, 1, 1, K) depthwise
    x = torch.nn.functional.pad(batch.float(), (half, half, 0, 0), mode="replicate")
    return _to_uint8(torch.nn.functional.conv2d(x, kernel, groups=3))


# ---------------------------------------------------------------------------- sensor and link


def _sensor_noise(batch: torch.Tensor, p: Mapping[str, float], seed: int) -> torch.Tensor:
    # Read noise plus shot noise, in digital numbers (DN): var = read**2 + shot_gain * signal, the
    # Gaussian approximation of Poisson photon counts. One standard-normal field per frame is
    # scaled by the severity's sigma, so a higher severity is the same noise, only stronger.
    x = batch.float()
    z = torch.stack(
        [torch.randn(img.shape, generator=_frame_generator(seed, img), dtype=torch.float32) for img in batch]
    ).to(batch.device)
    sigma = torch.sqrt(p["read_sigma_dn"] ** 2 + p["shot_gain"] * x)
    return _to_uint8(x + sigma * z)


def _jpeg(batch: torch.Tensor, p: Mapping[str, float], seed: int) -> torch.Tensor:
    # Camera or gateway re-encodes frames to save bandwidth. torchvision's codec runs on CPU.
    out = F.jpeg(batch.cpu(), int(p["quality"]))
    return out.to(batch.device)


# ---------------------------------------------------------------------------- dust, fixture


def _dust(batch: torch.Tensor, p: Mapping[str, float], seed: int) -> torch.Tensor:
    # Dust on the protective window, slightly out of focus: soft dark discs. Smudges (oil, a
    # fingerprint) are large hazy patches: local blur plus a veil of scattered light. The specks of
    # severity s are a superset of those of s-1 (same seed, first n specks), so damage only grows.
    h, w = int(batch.shape[-2]), int(batch.shape[-1])
    side = _short_side(batch)
    rng = _rng(seed, "dust")
    max_specks, max_smudges = 64, 4
    centres = rng.uniform(0.0, 1.0, size=(max_specks, 2)) * np.array([h, w])
    radii = np.exp(rng.uniform(math.log(0.006), math.log(0.025), size=max_specks)) * side
    smudge_centres = rng.uniform(0.15, 0.85, size=(max_smudges, 2)) * np.array([h, w])
    smudge_radii = rng.uniform(0.08, 0.14, size=max_smudges) * side
    ys, xs = _grid(h, w, batch.device)

    out = batch
    n_smudges = int(p["smudges"])
    if n_smudges:
        veil = torch.zeros(h, w, device=batch.device)
        for (cy, cx), r in zip(smudge_centres[:n_smudges], smudge_radii[:n_smudges], strict=True):
            d2 = (ys - float(cy)) ** 2 + (xs - float(cx)) ** 2
            veil = torch.maximum(veil, torch.exp(-d2 / (2 * float(r) ** 2)))
        sigma = 0.02 * side
        k = 2 * math.ceil(3 * sigma) + 1
        # Haze target: blurred image lifted towards light grey (contrast loss from scattering).
        hazy = 0.75 * F.gaussian_blur(batch, [k, k], [sigma, sigma]).float() + 0.25 * 200.0
        out = _blend(batch, p["smudge_opacity"] * veil, hazy)

    # Union of soft discs: alpha = 1 - prod(1 - a_i), each a_i a disc with a ~1.5 px soft edge.
    keep = torch.ones(h, w, device=batch.device)
    for (cy, cx), r in zip(centres[: int(p["specks"])], radii[: int(p["specks"])], strict=True):
        d = torch.sqrt((ys - float(cy)) ** 2 + (xs - float(cx)) ** 2)
        disc = torch.sigmoid((float(r) * p["size_scale"] - d) / 1.5)
        keep = keep * (1 - p["speck_opacity"] * disc)
    return _blend(out, 1 - keep, 30.0)


def _misalign(batch: torch.Tensor, p: Mapping[str, float], seed: int) -> torch.Tensor:
    # The part sits rotated and shifted in a worn or knocked fixture. The direction (signs) is fixed
    # by the seed, as a fixture error is systematic; magnitudes grow with severity. Uncovered area
    # is filled black (the dark belt behind the part).
    h, w = int(batch.shape[-2]), int(batch.shape[-1])
    signs = _rng(seed, "misalign").choice([-1.0, 1.0], size=3)
    shift = p["shift_frac"] * _short_side(batch)
    return F.affine(
        batch,
        angle=float(signs[0] * p["angle_deg"]),
        translate=[float(signs[1] * shift), float(signs[2] * shift)],
        scale=1.0,
        shear=[0.0, 0.0],
        interpolation=F.InterpolationMode.BILINEAR,
        fill=[0.0],
        center=[w / 2, h / 2],
    )


# ---------------------------------------------------------------------------- registry


def _levels(**columns: tuple[float, ...]) -> tuple[Mapping[str, float], ...]:
    rows = zip(*columns.values(), strict=True)
    return tuple(dict(zip(columns, row, strict=True)) for row in rows)


# Severity 1 is at the edge of what an operator would notice on a monitor; 5 is a clear fault
# (a lamp failing, a lens badly out of focus, a fixture knocked out of place).
CORRUPTIONS: dict[str, Corruption] = {
    c.name: c
    for c in [
        Corruption(
            "dim",
            "lighting drops (ageing lamp, dirty diffuser, shorter exposure)",
            "exposure change in stops (ev)",
            _levels(ev=(-0.5, -1.0, -1.5, -2.0, -3.0)),
            _exposure,
        ),
        Corruption(
            "bright",
            "lighting up, overexposure with clipped highlights",
            "exposure change in stops (ev)",
            _levels(ev=(0.33, 0.67, 1.0, 1.5, 2.0)),
            _exposure,
        ),
        Corruption(
            "color_temp",
            "lamp colour temperature drifts warm under a fixed white balance (set for 6500 K)",
            "lamp colour temperature in kelvin",
            _levels(kelvin=(6000.0, 5200.0, 4500.0, 3800.0, 3200.0)),
            _color_temp,
        ),
        Corruption(
            "glare",
            "specular reflection of the lamp: bright blob with a saturated core",
            "blob radius as fraction of the short side; peak opacity (>1 saturates the core)",
            _levels(
                radius_frac=(0.05, 0.07, 0.09, 0.12, 0.15),
                peak=(0.3, 0.5, 0.8, 1.2, 1.6),
            ),
            _glare,
        ),
        Corruption(
            "focus_blur",
            "lens out of focus (part height change, focus drift)",
            "Gaussian PSF sigma in px at a 224 px short side",
            _levels(sigma_px_at_224=(0.6, 1.0, 1.6, 2.4, 3.5)),
            _focus_blur,
        ),
        Corruption(
            "motion_blur",
            "part moves along the conveyor during the exposure",
            "horizontal streak length in px at a 224 px short side",
            _levels(length_px_at_224=(2.0, 4.0, 7.0, 11.0, 16.0)),
            _motion_blur,
        ),
        Corruption(
            "sensor_noise",
            "sensor read and shot noise (high gain in low light, hot sensor)",
            "read noise sigma in DN; shot noise variance per DN of signal",
            _levels(
                read_sigma_dn=(2.0, 4.0, 6.0, 9.0, 13.0),
                shot_gain=(0.03, 0.06, 0.12, 0.2, 0.3),
            ),
            _sensor_noise,
        ),
        Corruption(
            "jpeg",
            "JPEG re-encoding on the camera link",
            "JPEG quality (100 best)",
            _levels(quality=(75.0, 55.0, 35.0, 20.0, 10.0)),
            _jpeg,
        ),
        Corruption(
            "dust",
            "dust specks and smudges on the protective window",
            "number of specks, speck opacity and size scale; number and opacity of smudges",
            _levels(
                specks=(4.0, 8.0, 16.0, 28.0, 44.0),
                speck_opacity=(0.5, 0.6, 0.7, 0.8, 0.9),
                size_scale=(1.0, 1.1, 1.2, 1.35, 1.5),
                smudges=(0.0, 0.0, 1.0, 2.0, 3.0),
                smudge_opacity=(0.0, 0.0, 0.5, 0.6, 0.7),
            ),
            _dust,
        ),
        Corruption(
            "misalign",
            "part rotated and shifted in a worn or knocked fixture",
            "rotation in degrees; shift as fraction of the short side",
            _levels(
                angle_deg=(0.5, 1.0, 2.0, 3.0, 5.0),
                shift_frac=(0.005, 0.01, 0.02, 0.035, 0.05),
            ),
            _misalign,
        ),
    ]
}


def corruption_names() -> list[str]:
    """Names of all registered corruptions, in registry order."""
    return list(CORRUPTIONS)


def get_corruption(name: str) -> Corruption:
    """The registered corruption `name`; ValueError naming the known ones if there is none."""
    try:
        return CORRUPTIONS[name]
    except KeyError:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(corruption_names())}") from None


def apply_corruption(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Apply corruption `name` at `severity` (1..5) to uint8 images (N,3,H,W) or (3,H,W).

    Deterministic given `seed`; each image's result does not depend on the batch it is in.
    """
    return get_corruption(name).apply(images, severity, seed)
