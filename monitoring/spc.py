"""SPC p-charts on the defect rate and the review rate, with Western Electric rules.

Subgroups are consecutive, non-overlapping runs of ``m`` parts; each point is the share of parts
in the subgroup judged ``defect`` (or sent to ``review``). The centre line ``p`` comes from the
reference (the model's verdicts on its calibration split), and the reference's own sampling error
is part of sigma: ``sigma = sqrt(p (1 - p) (1/m + 1/n_ref))``. The rules, on ``z = (p_i - p)/sigma``:

1. one point beyond ``3k`` sigma (critical);
2. two of three consecutive points beyond ``2k`` sigma on the same side (warning);
3. four of five consecutive points beyond ``k`` sigma on the same side (warning);
4. eight consecutive points on the same side of the centre line (warning).

``k = 1`` is the textbook chart. The zone scale ``k`` is the smallest that keeps in-control streams
within the false-alarm budget (simulated, with the reference's error drawn afresh every replicate).
Rule 4 only holds when the centre line is known much better than one subgroup's spread
(``n_ref >= 16 m``): with a small reference a slightly wrong centre puts every point on one side,
so the rule would report the reference's error rather than the line's; it is then switched off,
as it is when no zone scale keeps it within the budget (a very skewed binomial).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RULES: dict[str, str] = {
    "rule1": "one point beyond 3 sigma",
    "rule2": "2 of 3 points beyond 2 sigma, same side",
    "rule3": "4 of 5 points beyond 1 sigma, same side",
    "rule4": "8 points in a row on one side of the centre",
}
CHARTS: tuple[str, ...] = ("defect_rate", "review_rate")
_K_GRID: tuple[float, ...] = tuple(round(1.0 + 0.05 * i, 2) for i in range(41))  # 1.0 .. 3.0


@dataclass(frozen=True)
class RuleHit:
    """A rule that fired at subgroup ``index`` (the newest point of its pattern)."""

    index: int
    rule: str
    side: str  # "high" | "low"

    @property
    def level(self) -> str:
        return "critical" if self.rule == "rule1" else "warning"

    def describe(self) -> str:
        return f"{RULES[self.rule]} ({self.side})"


@dataclass(frozen=True)
class PChart:
    """A calibrated p-chart: centre from the reference, zone scale from the false-alarm budget."""

    name: str
    center: float
    n_reference: int
    subgroup: int
    k: float
    run_rule: bool

    def sigma(self, m: int | np.ndarray) -> np.ndarray:
        p = self.center
        return np.sqrt(p * (1 - p) * (1.0 / np.asarray(m, dtype=np.float64) + 1.0 / self.n_reference))

    def limits(self, m: int) -> tuple[float, float]:
        """Lower and upper control limits (shares) for a subgroup of ``m`` parts."""
        s = float(self.sigma(m))
        return max(0.0, self.center - 3 * self.k * s), min(1.0, self.center + 3 * self.k * s)

    def z(self, counts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        shares = np.asarray(counts, dtype=np.float64) / np.asarray(sizes, dtype=np.float64)
        return (shares - self.center) / self.sigma(sizes)

    def check(self, counts: np.ndarray, sizes: np.ndarray) -> list[RuleHit]:
        """Every rule hit in a sequence of subgroups (oldest first)."""
        return western_electric(self.z(counts, sizes), k=self.k, run_rule=self.run_rule)

    def describe(self) -> dict[str, float | int | bool | str]:
        lcl, ucl = self.limits(self.subgroup)
        return {
            "chart": self.name,
            "center": round(self.center, 5),
            "lcl": round(lcl, 5),
            "ucl": round(ucl, 5),
            "subgroup": self.subgroup,
            "k": self.k,
            "run_rule": self.run_rule,
            "n_reference": self.n_reference,
        }


def western_electric(z: np.ndarray, *, k: float = 1.0, run_rule: bool = True) -> list[RuleHit]:
    """Rule hits on standardised points ``z`` (oldest first); a hit needs its newest point in it."""
    flags = _rule_flags(np.asarray(z, dtype=np.float64)[None, :], k, run_rule)
    hits: list[RuleHit] = []
    for rule, (high, low) in flags.items():
        hits += [RuleHit(int(i), rule, "high") for i in np.flatnonzero(high[0])]
        hits += [RuleHit(int(i), rule, "low") for i in np.flatnonzero(low[0])]
    return sorted(hits, key=lambda h: (h.index, h.rule))


def _count_in_window(mask: np.ndarray, width: int) -> np.ndarray:
    """How many of the last ``width`` points (ending at each point) are set; mask (R, T)."""
    c = np.cumsum(mask, axis=1, dtype=np.int64)
    out = c.copy()
    out[:, width:] = c[:, width:] - c[:, :-width]
    return out


def _rule_flags(z: np.ndarray, k: float, run_rule: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {"rule1": (z > 3 * k, z < -3 * k)}
    for rule, zone, need, width in (("rule2", 2 * k, 2, 3), ("rule3", k, 4, 5)):
        hi, lo = z > zone, z < -zone
        out[rule] = (hi & (_count_in_window(hi, width) >= need), lo & (_count_in_window(lo, width) >= need))
    if run_rule:
        above, below = z > 0, z < 0
        out["rule4"] = (_count_in_window(above, 8) >= 8, _count_in_window(below, 8) >= 8)
    return out


def _alarm_rate(p: float, n_ref: int, m: int, k: float, run_rule: bool, seed: int) -> float:
    """Simulated false alarms per 10,000 in-control parts (every flagged subgroup counts)."""
    rng = np.random.default_rng(seed)
    reps, length = 400, 250
    # Reference error: each replicate draws the centre it would have estimated from n_ref parts.
    center = np.maximum(rng.binomial(n_ref, p, size=(reps, 1)) / n_ref, 0.5 / n_ref)
    center = np.minimum(center, 1 - 0.5 / n_ref)
    shares = rng.binomial(m, p, size=(reps, length)) / m
    sigma = np.sqrt(center * (1 - center) * (1.0 / m + 1.0 / n_ref))
    flags = _rule_flags((shares - center) / sigma, k, run_rule)
    any_flag = np.zeros_like(shares, dtype=bool)
    for high, low in flags.values():
        any_flag |= high | low
    return float(any_flag.sum()) / (reps * length * m) * 10_000.0


def calibrate_chart(
    name: str,
    center: float,
    n_reference: int,
    *,
    subgroup: int,
    false_alarm_per_10k: float = 1.0,
    seed: int = 0,
) -> PChart:
    """A p-chart whose in-control false alarms stay within ``false_alarm_per_10k`` parts."""
    if n_reference < 1 or subgroup < 1:
        raise ValueError(f"need a reference and subgroups of ≥ 1 part; got {n_reference}, {subgroup}")
    # A share of exactly 0 or 1 on the reference has no spread; half a part keeps sigma honest.
    p = min(max(center, 0.5 / n_reference), 1 - 0.5 / n_reference)
    # The run rule is tried first where the reference allows it; with a skewed (small p) binomial
    # a share sits below its mean more often than above, so eight in a row on one side can be
    # common on its own: if no zone scale then meets the budget, the rule is dropped instead of
    # widening every zone until the chart sees nothing.
    for run_rule in (True, False) if n_reference >= 16 * subgroup else (False,):
        for k in _K_GRID:
            if _alarm_rate(p, n_reference, subgroup, k, run_rule, seed) <= false_alarm_per_10k:
                return PChart(name, p, n_reference, subgroup, k, run_rule)
    chosen, run_rule = _K_GRID[-1], False
    return PChart(name, p, n_reference, subgroup, chosen, run_rule)


def subgroup_counts(flags: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts and sizes of consecutive complete subgroups of ``m`` parts in a 0/1 sequence."""
    whole = (len(flags) // m) * m
    if whole == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    counts = np.asarray(flags[:whole], dtype=np.int64).reshape(-1, m).sum(axis=1)
    return counts, np.full(len(counts), m, dtype=np.int64)


def binomial_sigma(p: float, m: int) -> float:
    """Plain binomial sigma of a share, for display."""
    return math.sqrt(max(p * (1 - p), 0.0) / m)
