"""The review band of a model that learned from good parts only: what good parts alone can certify.

A classifier's band (:mod:`kensa.models.evaluation.thresholds`) certifies the escape rate on
defective calibration parts and the false-reject rate on good ones. An anomaly model often starts
with good parts only; then

- the **false-reject rate** is still certified: ``t_defect`` is chosen by the same Learn-then-Test
  fixed sequence over good calibration parts, so at most ``max_false_reject`` of good parts are
  flagged, at confidence ``1 - delta``;
- the **review load on good parts** is certified the same way: ``t_ok`` is the threshold above which
  at most ``max_review_good`` of good parts score, so at least ``1 - max_review_good -
  max_false_reject`` of good parts pass without a person;
- the **escape rate is not certified**, and the band says so and how many defective calibration
  parts would certify it (``n_needed(alpha, delta)``; with none observed escaping).

With at least that many defective calibration parts the band is the classifier's, both rates
certified. With fewer good calibration parts than the false-reject guarantee needs the band is
refused (:class:`NotEnoughCalibrationError` names the number), rather than handed out uncertified.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import numpy.typing as npt

from kensa.models.evaluation.thresholds import (
    NO_AUTO_PASS,
    BandResult,
    _between,
    _fixed_sequence,
    _rate,
    apply_band,
    calibrate_band,
    n_needed,
)

DEFAULT_MAX_REVIEW_GOOD = 0.10


class NotEnoughCalibrationError(ValueError):
    """Too few calibration parts for the guarantee asked for; says how many are needed."""

    def __init__(self, have: int, need: int, rate: float, delta: float) -> None:
        self.have, self.need = have, need
        super().__init__(
            f"{have} good calibration parts cannot certify a false-reject rate <= {rate:.2%} at "
            f"{1 - delta:.0%} confidence; at least {need} are needed (add good parts or relax "
            f"max_false_reject / delta)"
        )


def calibrate_anomaly_band(
    scores: npt.ArrayLike,
    is_defective: npt.ArrayLike,
    alpha: float = 0.05,
    delta: float = 0.1,
    max_false_reject: float = 0.05,
    max_review_good: float = DEFAULT_MAX_REVIEW_GOOD,
) -> BandResult:
    """The band for anomaly scores in [0, 1]; see the module docstring for what it certifies."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(is_defective, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores {s.shape} and is_defective {y.shape} must be matching 1-D arrays")
    good = s[~y]
    need_good = n_needed(max_false_reject, delta)
    if good.size < need_good:
        raise NotEnoughCalibrationError(int(good.size), need_good, max_false_reject, delta)
    if int(y.sum()) >= n_needed(alpha, delta):
        return calibrate_band(s, y, alpha=alpha, delta=delta, max_false_reject=max_false_reject)

    desc = np.concatenate([[2.0], np.unique(good)[::-1]])  # strict -> lenient, as for t_defect
    sorted_good = np.sort(good)
    above = good.size - np.searchsorted(sorted_good, desc, side="left")  # good parts with s >= t
    i_def, _ = _fixed_sequence(above, good.size, max_false_reject, delta)
    t_defect = _between(desc, i_def, upper=0.0)
    # t_ok: good parts scoring above it (review or flagged) stay within max_review_good.
    rate_ok = max(max_review_good, max_false_reject)
    above_ok = good.size - np.searchsorted(sorted_good, desc, side="right")  # good with s > t
    if good.size >= n_needed(rate_ok, delta):
        # The lowest certified cut (fewest defects pass), moved halfway up to the next score:
        # "ok" is s <= t_ok, so the part scoring desc[i] itself passes, as counted.
        i_ok, _ = _fixed_sequence(above_ok, good.size, rate_ok, delta)
        t_ok = min(float(desc[i_ok] + desc[max(i_ok - 1, 0)]) / 2, 1.0, t_defect)
    else:
        t_ok = NO_AUTO_PASS
    verdicts = apply_band(np.clip(s, 0, 1), t_ok, t_defect)
    review_rate = float((verdicts == "review").mean())
    n_def = int(y.sum())
    result = BandResult(
        t_ok=float(t_ok),
        t_defect=float(t_defect),
        alpha=float(alpha),
        delta=float(delta),
        max_false_reject=float(max_false_reject),
        escape_rate=_rate(verdicts[y] == "ok"),
        false_reject_rate=_rate(verdicts[~y] == "defect"),
        review_rate=review_rate,
        automation_rate=1.0 - review_rate,
        n_defective=n_def,
        n_good=int(good.size),
        n_defective_needed=n_needed(alpha, delta),
        n_good_needed=need_good,
        escape_guaranteed=False,
        false_reject_guaranteed=True,
        guaranteed=False,
        message="",
    )
    conf = f"{1 - delta:.0%}"
    message = (
        f"False-reject rate certified <= {max_false_reject:.2%} and good parts sent to a person "
        f"<= {rate_ok:.2%} at {conf} confidence from {good.size} good calibration parts. "
        f"ESCAPE RATE NOT CERTIFIED: the model learned from good parts only and "
        f"{n_def} defective calibration parts cannot certify escapes <= {alpha:.2%}; "
        f"{n_needed(alpha, delta)} defective calibration parts with none passed would. "
        f"On calibration: false-reject rate {result.false_reject_rate:.2%}, review "
        f"{review_rate:.1%}, automation {result.automation_rate:.1%}."
    )
    return replace(result, message=message)
