"""The KPI gate: target vs achieved, one row per KPI, and the gap in words when it fails."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kensa.flows.config import KPI


class GateFailedError(RuntimeError):
    """A stage missed its KPI; the flow stops before any further spend."""


@dataclass(frozen=True)
class GateRow:
    kpi: str
    target: str
    achieved: str
    passed: bool
    gap: str


@dataclass(frozen=True)
class GateResult:
    passed: bool
    rows: list[GateRow]

    @property
    def gaps(self) -> list[str]:
        return [r.gap for r in self.rows if not r.passed]

    def message(self) -> str:
        if self.passed:
            return "KPI gate passed: " + "; ".join(f"{r.kpi} {r.achieved}" for r in self.rows)
        return "KPI gate failed: " + "; ".join(self.gaps)

    def markdown(self, title: str) -> str:
        lines = [
            f"## {title}: {'PASSED' if self.passed else 'FAILED'}",
            "",
            "| KPI | target | achieved | |",
            "|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(f"| {r.kpi} | {r.target} | {r.achieved} | {'✅' if r.passed else '❌'} |")
        if not self.passed:
            lines += ["", "**Gap:** " + "; ".join(self.gaps)]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "rows": [asdict(r) for r in self.rows]}


def corrupted_escape(robustness: dict[str, Any], max_severity: int) -> float:
    """Mean escape rate over the corruption suite at severities up to ``max_severity``."""
    values = [
        sev[str(s)]["escape_rate"]
        for sev in robustness["per_corruption"].values()
        for s in range(1, max_severity + 1)
    ]
    return sum(values) / len(values)


def lower_bound(hits: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson lower bound of a binomial rate at ``confidence``."""
    from scipy.stats import beta

    return 0.0 if hits <= 0 else float(beta.ppf(1.0 - confidence, hits, n - hits + 1))


def evaluate_gate(metrics: dict[str, Any], kpi: KPI, check_relative_ce: bool = False) -> GateResult:
    """Compare a stage's metrics with the KPI; the band must also carry its guarantee.

    The band certifies escape and false-reject rates on the calibration split. The test split is an
    independent check of that certificate, so a rate there fails the gate only when it exceeds the
    target beyond sampling noise: when even its lower confidence bound (at the KPI's confidence) is
    above the target. A certified 5 % rate lands above 5 % on half of all test splits; failing those
    would make the gate a coin toss. Without part counts the point estimate is compared as it is.
    """
    rows: list[GateRow] = []

    def rate_row(name: str, key: str, base: str, target: float) -> None:
        if metrics.get(key) is None:
            # An anomaly model judged on good parts only: no defective test part, no escape rate.
            gap = f"{name} unknown: the test split has no {base.removeprefix('n_')} parts to measure it on"
            rows.append(GateRow(name, f"≤ {target:.2%}", "unknown", False, gap))
            return
        achieved, n = float(metrics[key]), metrics.get(base)
        if not n:
            row(name, achieved, target, True)
            return
        hits = round(achieved * int(n))
        low = lower_bound(hits, int(n), kpi.confidence)
        ok = low <= target
        conf = f"{kpi.confidence:.0%}"
        what = f"{achieved:.2%} ({hits}/{n})"
        if ok and achieved > target:
            what += f", within sampling: {conf} lower bound {low:.2%}"
        gap = (
            ""
            if ok
            else (
                f"{name} {achieved:.2%} ({hits} of {n} test parts) vs target ≤ {target:.2%}: "
                f"above it even at its {conf} lower bound {low:.2%}"
            )
        )
        rows.append(GateRow(name, f"≤ {target:.2%}", what, ok, gap))

    def row(name: str, achieved: float, target: float, at_most: bool, fmt: str = ".2%") -> None:
        ok = achieved <= target if at_most else achieved >= target
        sign = "≤" if at_most else "≥"
        gap = (
            ""
            if ok
            else (
                f"{name} {achieved:{fmt}} vs target {sign} {target:{fmt}} "
                f"(off by {abs(achieved - target):{fmt}})"
            )
        )
        rows.append(GateRow(name, f"{sign} {target:{fmt}}", f"{achieved:{fmt}}", ok, gap))

    band = metrics["band"]
    guaranteed = bool(band.get("guaranteed"))
    rows.append(
        GateRow(
            "escape guarantee",
            f"≤ {kpi.max_escape_rate:.2%} at {kpi.confidence:.0%} confidence",
            "certified" if guaranteed else "not certified",
            guaranteed,
            "" if guaranteed else f"review band not certified: {band.get('message', '')}",
        )
    )
    rate_row("escape rate", "escape_rate", "n_defective", kpi.max_escape_rate)
    rate_row("false reject rate", "false_reject_rate", "n_good", kpi.max_false_reject_rate)
    row("automation rate", metrics["automation_rate"], kpi.min_automation_rate, False, ".1%")
    rob = metrics.get("robustness")
    if rob:
        row(
            f"corrupted escape rate (severity ≤ {kpi.corruption_severity})",
            corrupted_escape(rob, kpi.corruption_severity),
            kpi.max_corrupted_escape_rate,
            True,
        )
        if check_relative_ce and rob.get("mean_relative_ce") is not None:
            row(
                "relative corruption error",
                rob["mean_relative_ce"],
                kpi.max_relative_ce,
                True,
                ".2f",
            )
    return GateResult(all(r.passed for r in rows), rows)
