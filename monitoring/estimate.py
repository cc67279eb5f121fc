"""Label-free estimate of a window's escape and false-reject rates (confidence-based, as NannyML's CBPE).

With calibrated probabilities ``q_i = P(defective | score_i)`` a window's expected number of
escapes is ``sum of q_i over parts passed as ok``, its expected defectives ``sum of q_i``, and so
on, without a single label. Calibration is a Platt fit on the reference (the calibration split,
where labels are known): ``q = sigmoid(a * logit(s) + b)`` with ``s = 1 - p(ok)``.

The estimate is only as good as the calibration, which holds while parts look like the reference:
when the inputs drift, the same score can mean something else (a blurred crack may score like a
clean part), so an estimate made on a drifted window is marked unreliable and says why.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.special import expit

_EPS = 1e-6


def _logit(s: np.ndarray) -> np.ndarray:
    s = np.clip(np.asarray(s, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(s / (1 - s))


@dataclass(frozen=True)
class Calibrator:
    """Platt scaling of the defect score: P(defective | s) = sigmoid(a · logit(s) + b)."""

    a: float
    b: float
    n: int  # reference parts it was fitted on

    def p_defective(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(expit(self.a * _logit(scores) + self.b), dtype=np.float64)


def fit_calibrator(scores: np.ndarray, defective: np.ndarray, *, l2: float = 1e-3) -> Calibrator:
    """Fit Platt scaling by Newton's method, with Platt's smoothed targets.

    The targets ``(n+ + 1)/(n+ + 2)`` and ``1/(n- + 2)`` instead of 1 and 0 keep a perfectly
    separated small reference from producing infinite slopes.
    """
    x = _logit(scores)
    y = np.asarray(defective, dtype=np.float64)
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"need matching scores and labels for at least 2 parts; got {len(x)}, {len(y)}")
    n_pos, n_neg = float(y.sum()), float(len(y) - y.sum())
    t = np.where(y > 0.5, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    w = np.array([1.0, 0.0])
    design = np.stack([x, np.ones_like(x)], axis=1)
    for _ in range(100):
        q = expit(design @ w)
        grad = design.T @ (q - t) + l2 * np.array([w[0], 0.0])
        hess = design.T @ (design * (q * (1 - q))[:, None]) + l2 * np.diag([1.0, 0.0]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        # Damped Newton: a tiny, separable reference must not throw the slope to infinity.
        step *= min(1.0, 5.0 / max(float(np.abs(step).max()), 1e-12))
        w = w - step
        if float(np.abs(step).max()) < 1e-10:
            break
    return Calibrator(float(w[0]), float(w[1]), len(x))


@dataclass(frozen=True)
class Estimate:
    """Expected QC figures of one window, from probabilities alone."""

    n: int
    expected_defect_share: float
    expected_escape_rate: float | None  # escapes / defectives; None when no defective is expected
    escape_rate_low: float | None
    escape_rate_high: float | None
    expected_false_reject_rate: float | None  # false rejects / good parts
    review_rate: float
    reliable: bool
    reason: str | None

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def estimate_window(
    scores: np.ndarray,
    calibrator: Calibrator,
    *,
    t_ok: float,
    t_defect: float,
    drift_level: str = "none",
    min_expected_defectives: float = 3.0,
) -> Estimate:
    """Expected escape and false-reject rates of a window of defect scores.

    ``drift_level`` is the drift policy's verdict on the same window: anything but ``none`` marks
    the estimate unreliable. So does a window expected to hold fewer than
    ``min_expected_defectives`` defective parts (a rate over two or three parts is noise).
    """
    s = np.asarray(scores, dtype=np.float64)
    n = len(s)
    if n == 0:
        raise ValueError("cannot estimate rates of an empty window")
    q = calibrator.p_defective(s)
    passed, flagged = s <= t_ok, s >= t_defect
    review = ~passed & ~flagged
    defectives, goods = float(q.sum()), float((1 - q).sum())
    escapes = float(q[passed].sum())
    false_rejects = float((1 - q[flagged]).sum())
    escape_rate = escapes / defectives if defectives > _EPS else None
    low = high = None
    if escape_rate is not None:
        # Poisson-binomial spread of the escape count, scaled by the expected defectives: the
        # spread a perfectly calibrated model would still show on a window of this size.
        sd = math.sqrt(float((q[passed] * (1 - q[passed])).sum())) / defectives
        low, high = max(0.0, escape_rate - 1.96 * sd), min(1.0, escape_rate + 1.96 * sd)
    reasons = []
    if drift_level != "none":
        reasons.append(f"inputs drifted ({drift_level}): calibration from the reference may not hold")
    if defectives < min_expected_defectives:
        reasons.append(f"only {defectives:.1f} defective parts expected in the window")
    return Estimate(
        n=n,
        expected_defect_share=defectives / n,
        expected_escape_rate=escape_rate,
        escape_rate_low=low,
        escape_rate_high=high,
        expected_false_reject_rate=false_rejects / goods if goods > _EPS else None,
        review_rate=float(review.mean()),
        reliable=not reasons,
        reason="; ".join(reasons) or None,
    )
