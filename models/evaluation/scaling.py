"""Scaling curves: error vs parameters and vs data as a power law with an offset; effective robustness."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit


@dataclass(frozen=True)
class PowerLaw:
    """error(x) = a · x^(−b) + c; ``c`` is the error no amount of x removes (the floor)."""

    a: float
    b: float
    c: float
    n_points: int
    fitted: bool
    note: str = ""

    def __call__(self, x: np.ndarray | float) -> np.ndarray:
        return self.a * np.power(np.asarray(x, dtype=float), -self.b) + self.c

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _law(x: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return a * np.power(x, -b) + c


def fit_power_law(x: list[float] | np.ndarray, error: list[float] | np.ndarray) -> PowerLaw:
    """Fit error = a·x^−b + c by least squares in x normalised to its smallest value.

    With fewer than three distinct x the curve is underdetermined: a two-point power law without
    offset is returned (or a flat line for one point) and ``fitted`` is False, so nobody reads a
    floor into two points.
    """
    xs = np.asarray(x, dtype=float)
    ys = np.asarray(error, dtype=float)
    distinct = np.unique(xs)
    if len(distinct) == 0:
        return PowerLaw(0.0, 0.0, 0.0, 0, False, "no points")
    x0 = distinct[0]
    if len(distinct) < 3:
        if len(distinct) == 1:
            return PowerLaw(0.0, 0.0, float(ys.mean()), len(xs), False, "one x value: no trend")
        # Mean error at each x, then the exact two-point power law through them.
        y1, y2 = (float(ys[xs == d].mean()) for d in distinct[:2])
        if y1 > 0 and y2 > 0:
            b = -np.log(y2 / y1) / np.log(distinct[1] / distinct[0])
            a = y1 * (distinct[0] / x0) ** b
            return PowerLaw(
                float(a) * x0**b,
                float(b),
                0.0,
                len(xs),
                False,
                "two x values: power law without offset",
            )
        return PowerLaw(0.0, 0.0, float(ys.mean()), len(xs), False, "zero error: no trend")
    xn = xs / x0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            (a, b, c), _ = curve_fit(
                _law,
                xn,
                ys,
                p0=(max(ys.max() - ys.min(), 1e-3), 0.5, max(ys.min() * 0.5, 0.0)),
                bounds=([0.0, 0.0, 0.0], [10.0, 3.0, 1.0]),
                maxfev=20000,
            )
    except (RuntimeError, ValueError) as exc:
        return PowerLaw(0.0, 0.0, float(ys.mean()), len(xs), False, f"fit failed: {exc}")
    # Back to raw x: a·(x/x0)^−b = (a·x0^b)·x^−b.
    return PowerLaw(float(a * x0**b), float(b), float(c), len(xs), True)


def effective_robustness(clean_error: list[float], corrupted_error: list[float]) -> dict[str, Any]:
    """How much better each model does under corruption than its clean error predicts.

    Fits corrupted = m·clean + k across the trials (the "robustness line"); a trial above the line
    (positive effective robustness) is more robust than size and accuracy alone explain.
    """
    ce = np.asarray(clean_error, dtype=float)
    co = np.asarray(corrupted_error, dtype=float)
    if len(ce) < 2 or np.ptp(ce) < 1e-9:
        return {
            "slope": None,
            "intercept": None,
            "per_trial": [0.0] * len(ce),
            "note": "needs two trials with different clean error",
        }
    m, k = np.polyfit(ce, co, 1)
    predicted = m * ce + k
    return {
        "slope": float(m),
        "intercept": float(k),
        "per_trial": (predicted - co).tolist(),
        "note": "",
    }
