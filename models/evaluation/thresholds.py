"""Review-band thresholds with a finite-sample escape-rate guarantee (Learn-then-Test).

Verdict rule for a part with defect score s = 1 - p(ok) in [0, 1]:

    s <= t_ok            -> "ok"      (passed automatically)
    s >= t_defect        -> "defect"  (flagged automatically)
    otherwise            -> "review"  (a person looks)

"ok" wins a tie, so t_ok == t_defect means an empty review band.

Guarantee (kensa's vocabulary: escape rate = escapes / defective parts). With probability at least
1 - delta over the draw of the calibration set, for new parts from the same distribution,

    escape rate        P(s <= t_ok     | defective) <= alpha
    false-reject rate  P(s >= t_defect | good)      <= max_false_reject

each holding on its own at confidence 1 - delta. A defective part sent to review is not an escape:
the guarantee assumes the reviewer catches it. The rate is over defective parts, not over passed
parts, so it does not depend on how often defects occur on the line; the expected number of escapes
per million parts is alpha * defect prevalence * 1e6 at most.

Method: Learn-then-Test (Angelopoulos, Bates, Candes, Jordan, Lei 2021). For each candidate t_ok,
ordered from strict (small) to lenient (large), test the null H_t: escape(t) > alpha with the exact
binomial p-value p(t) = P(Bin(n, alpha) <= k(t)), where k(t) counts defective calibration parts with
s <= t among n. Under H_t the count is stochastically larger than Bin(n, alpha), so p(t) is valid.
Fixed-sequence testing rejects H_t in order while p(t) <= delta and stops at the first failure;
since the risk is monotone in t this controls the family-wise error at delta, so the last rejected
t has escape(t) <= alpha with probability >= 1 - delta. The false-reject side is the mirror image
over good parts with thresholds ordered from high (strict) to low (lenient).

The candidates are the calibration scores themselves (plus a "decide nothing" sentinel). That is
still a valid test of an a-priori continuum of thresholds: k(t) only changes at calibration scores,
and the selected t_ok is the largest calibration score below the first defective score at which the
test fails, i.e. never more lenient than the continuum procedure would choose.

With too few parts of a class (fewer than ln(delta) / ln(1 - rate), where even zero observed errors
cannot certify the rate) the side falls back to deciding nothing automatically, guaranteed=False.

Taking the largest certified t_ok and the smallest certified t_defect minimises the review band,
i.e. maximises automation, subject to both guarantees.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats

__all__ = [
    "NO_AUTO_FLAG",
    "NO_AUTO_PASS",
    "VERDICTS",
    "BandResult",
    "apply_band",
    "calibrate_band",
    "n_needed",
]

VERDICTS: tuple[str, str, str] = ("ok", "review", "defect")
# Thresholds outside the score range [0, 1]: nothing is passed / flagged automatically.
NO_AUTO_PASS = -1.0
NO_AUTO_FLAG = 2.0
_SCORE_TOL = 1e-6


@dataclass(frozen=True)
class BandResult:
    """A calibrated review band and what it achieved on the calibration split."""

    t_ok: float
    t_defect: float
    alpha: float  # target escape rate (escapes / defective parts)
    delta: float  # 1 - delta = confidence of each guarantee
    max_false_reject: float  # target false-reject rate (false rejects / good parts)
    escape_rate: float  # achieved on calibration
    false_reject_rate: float  # achieved on calibration
    review_rate: float  # share of calibration parts sent to a person
    automation_rate: float  # 1 - review_rate
    n_defective: int
    n_good: int
    n_defective_needed: int  # fewest defective parts with which any t_ok can certify alpha
    n_good_needed: int  # same for max_false_reject over good parts
    escape_guaranteed: bool
    false_reject_guaranteed: bool
    guaranteed: bool  # both guarantees hold at 1 - delta
    message: str

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (MLflow tags, ONNX metadata, reports)."""
        return asdict(self)


def n_needed(rate: float, delta: float) -> int:
    """Fewest parts n with which zero observed errors certify `rate` at confidence 1 - delta.

    The strictest test sees k = 0 errors; its p-value is (1 - rate)**n, which must be <= delta:
    n >= ln(delta) / ln(1 - rate).
    """
    _check_rate("rate", rate)
    _check_rate("delta", delta)
    n = math.ceil(math.log(delta) / math.log1p(-rate))
    # Guard against float rounding in the ratio: step to the exact boundary.
    while n > 0 and (1 - rate) ** (n - 1) <= delta:
        n -= 1
    while (1 - rate) ** n > delta:
        n += 1
    return n


def apply_band(defect_scores: npt.ArrayLike, t_ok: float, t_defect: float) -> npt.NDArray[np.str_]:
    """Verdict per part: "ok" if s <= t_ok, else "defect" if s >= t_defect, else "review"."""
    s = _as_scores(defect_scores)
    if t_ok > t_defect:
        raise ValueError(f"t_ok ({t_ok}) must not exceed t_defect ({t_defect})")
    verdicts = np.full(s.shape, "review", dtype="<U6")
    verdicts[s >= t_defect] = "defect"
    verdicts[s <= t_ok] = "ok"  # assigned last: "ok" wins when t_ok == t_defect
    return verdicts


def calibrate_band(
    defect_scores: npt.ArrayLike,
    is_defective: npt.ArrayLike,
    alpha: float = 0.01,
    delta: float = 0.1,
    max_false_reject: float = 0.05,
) -> BandResult:
    """Choose (t_ok, t_defect) on a calibration split; see the module docstring for the guarantee.

    With fewer defective parts than `n_defective_needed` no t_ok can be certified: the band falls
    back to t_ok = NO_AUTO_PASS (nothing is passed automatically; every part not flagged goes to
    review), escape_guaranteed=guaranteed=False, and the message says how many are needed. Passing
    "everything scored below every defective calibration part" instead would look safe (zero
    calibration escapes) but has an expected escape rate near 1 / (n + 1), and would hand out MORE
    automation the fewer defective parts were collected; falling back to nothing keeps t_ok
    monotone in the evidence. With too few good parts the defect side falls back the same way
    (t_defect = NO_AUTO_FLAG: nothing is flagged automatically).
    """
    s = _as_scores(defect_scores)
    y = np.asarray(is_defective)
    if y.shape != s.shape:
        raise ValueError(f"is_defective has shape {y.shape}, defect_scores {s.shape}; must match")
    if y.dtype != np.bool_:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("is_defective must be boolean (or 0/1)")
        y = y.astype(bool)
    if s.size == 0:
        raise ValueError("no calibration parts: defect_scores is empty")
    for name, rate in (("alpha", alpha), ("delta", delta), ("max_false_reject", max_false_reject)):
        _check_rate(name, rate)

    defective, good = s[y], s[~y]
    # Candidate thresholds: every calibration score, plus a strictest one that decides nothing, so
    # that "pass nothing" is itself a certified choice when the lowest scores are defective.
    scores = np.unique(s)
    asc = np.concatenate([[NO_AUTO_PASS], scores])  # strict -> lenient for t_ok
    desc = np.concatenate([[NO_AUTO_FLAG], scores[::-1]])  # strict -> lenient for t_defect

    # ok side: k(t) = #defective with s <= t (escapes), one p-value per candidate.
    k_ok = np.searchsorted(np.sort(defective), asc, side="right")
    i_ok, escape_certified = _fixed_sequence(k_ok, defective.size, alpha, delta)
    t_ok = _between(asc, i_ok, upper=1.0)
    # defect side, mirrored: j(t) = #good with s >= t (false rejects).
    j_def = good.size - np.searchsorted(np.sort(good), desc, side="left")
    i_def, fr_certified = _fixed_sequence(j_def, good.size, max_false_reject, delta)
    t_defect = _between(desc, i_def, upper=0.0)

    if t_ok >= t_defect:
        # Both certified regions overlap: any cut c in [t_defect, t_ok] keeps both guarantees
        # (ok = {s <= c} lies inside the certified ok set, defect = {s > c} inside the certified
        # defect set). The midpoint leaves the most margin on both sides; the band is empty.
        t_ok = t_defect = (t_ok + t_defect) / 2

    verdicts = apply_band(s, t_ok, t_defect)
    passed, flagged = verdicts == "ok", verdicts == "defect"
    review_rate = float((verdicts == "review").mean())
    result = BandResult(
        t_ok=float(t_ok),
        t_defect=float(t_defect),
        alpha=float(alpha),
        delta=float(delta),
        max_false_reject=float(max_false_reject),
        escape_rate=_rate(passed[y]),
        false_reject_rate=_rate(flagged[~y]),
        review_rate=review_rate,
        automation_rate=1.0 - review_rate,
        n_defective=int(defective.size),
        n_good=int(good.size),
        n_defective_needed=n_needed(alpha, delta),
        n_good_needed=n_needed(max_false_reject, delta),
        escape_guaranteed=escape_certified,
        false_reject_guaranteed=fr_certified,
        guaranteed=escape_certified and fr_certified,
        message="",
    )
    return replace(result, message=_message(result))


def _between(candidates: npt.NDArray[np.float64], i: int, upper: float) -> float:
    """The chosen candidate moved halfway to the next one (or to ``upper`` after the last).

    Every threshold strictly between two neighbouring calibration scores selects exactly the same
    calibration parts, so it carries the same certificate; sitting on a score instead would let a
    1e-8 difference between PyTorch and ONNX Runtime flip a verdict at the boundary.
    """
    if i == 0:
        return float(candidates[0])  # the "decide nothing" sentinel stays as it is
    following = candidates[i + 1] if i + 1 < len(candidates) else upper
    return float((candidates[i] + following) / 2)


def _fixed_sequence(
    errors: npt.NDArray[np.intp],
    n: int,
    rate: float,
    delta: float,
) -> tuple[int, bool]:
    """Index, in the strict -> lenient order, of the last of the leading run of rejected nulls.

    Index 0 is the "decide nothing" sentinel with zero errors; errors[i] counts errors among
    n calibration parts at candidate i and never decreases along the order. Returns (index,
    certified). The sentinel's p-value is (1 - rate)**n, so nothing is certified exactly when
    n < n_needed(rate, delta); the fallback is then the sentinel itself, uncertified.
    """
    if n == 0:
        return 0, False  # no parts of this class: decide nothing automatically
    # p(t) = P(Bin(n, rate) <= k(t)): the chance of seeing this few errors if the true rate were
    # `rate`; a small p rejects "rate exceeded". binom.cdf is exact (regularised incomplete beta).
    p_values = stats.binom.cdf(errors, n, rate)
    rejected = np.cumprod(p_values <= delta).astype(bool)  # stop at the first failure
    if rejected.any():
        return int(np.flatnonzero(rejected)[-1]), True
    return 0, False


def _message(r: BandResult) -> str:
    conf = f"{1 - r.delta:.0%}"
    parts = []
    if r.escape_guaranteed:
        parts.append(
            f"Escape rate certified <= {r.alpha:.2%} at {conf} confidence "
            f"from {r.n_defective} defective calibration parts."
        )
        if r.t_ok == NO_AUTO_PASS:
            parts.append("No part is passed automatically: the lowest scores include defects.")
    else:
        parts.append(
            f"NOT GUARANTEED: {r.n_defective} defective calibration parts cannot certify an "
            f"escape rate <= {r.alpha:.2%} at {conf} confidence; at least "
            f"{r.n_defective_needed} are needed."
        )
        parts.append("Fallback: no part is passed automatically; unflagged parts go to review.")
        if r.n_defective > 0:
            # Clopper-Pearson upper bound with zero escapes: solve (1 - p)**n = delta for p.
            best = 1 - r.delta ** (1 / r.n_defective)
            parts.append(f"The best escape rate this data could certify is {best:.1%}.")
    if r.false_reject_guaranteed:
        parts.append(
            f"False-reject rate certified <= {r.max_false_reject:.2%} at {conf} confidence "
            f"from {r.n_good} good calibration parts."
        )
    else:
        parts.append(
            f"NOT GUARANTEED: a false-reject rate <= {r.max_false_reject:.2%} needs at least "
            f"{r.n_good_needed} good calibration parts, have {r.n_good}; fallback: no part is "
            f"flagged automatically."
        )
    parts.append(
        f"On calibration: escape rate {r.escape_rate:.2%}, false-reject rate "
        f"{r.false_reject_rate:.2%}, review {r.review_rate:.1%}, "
        f"automation {r.automation_rate:.1%}."
    )
    return " ".join(parts)


def _as_scores(defect_scores: npt.ArrayLike) -> npt.NDArray[np.float64]:
    s = np.asarray(defect_scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"defect_scores must be 1-D, got shape {s.shape}")
    # 1 - p(ok) from float32 softmax can stray outside [0, 1] by rounding; more is a caller bug.
    if not np.isfinite(s).all() or (s < -_SCORE_TOL).any() or (s > 1 + _SCORE_TOL).any():
        raise ValueError("defect_scores must be finite and within [0, 1] (s = 1 - p(ok))")
    return np.clip(s, 0.0, 1.0)


def _check_rate(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number strictly between 0 and 1, got {value!r}")


def _rate(mask: npt.NDArray[np.bool_]) -> float:
    return float(mask.mean()) if mask.size else 0.0
