"""What an alert's page shows besides the alert row: the features that moved, control charts of
the line (drift score per window, defect and review rates as p-charts) and its Evidently report."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from sqlalchemy import select
from sqlalchemy.orm import Session

from kensa.serving.console.charts import BarChart, LineChart, hbars, run_chart
from kensa.store.models import Alert, DriftResult, Prediction

SPC_WINDOWS = 30
DEFAULT_WINDOW = 200
# The monitor writes {"name", "z"} for drift (signed z-score of a component) and {"name", "share",
# "rule"} for SPC; other monitors' shapes are read too.
_SCORE_KEYS = ("z", "score", "drift_score", "share", "distance", "statistic", "psi", "p_value", "value")
_NAME_KEYS = ("feature", "name", "column")


@dataclass(frozen=True)
class MovedFeature:
    name: str
    score: float | None
    detail: str  # e.g. "wasserstein 0.41, p 0.001"
    trend: LineChart | None = None  # its z in recent windows where it was among the top movers


@dataclass(frozen=True)
class SpcChart:
    title: str
    chart: LineChart
    note: str
    out_of_control: int


def moved_features(session: Session, alert: Alert) -> tuple[list[MovedFeature], BarChart | None]:
    """The alert's ``top_features`` as rows (any of the shapes a monitor may store), a bar chart
    of how far each moved, and each one's trend over the line's recent windows."""
    trends = _trends(_blocks(session, alert)) if alert.line_id is not None else {}
    rows: list[MovedFeature] = []
    for entry in alert.top_features or []:
        if isinstance(entry, str):
            rows.append(MovedFeature(entry, None, ""))
            continue
        if isinstance(entry, list | tuple) and entry and isinstance(entry[0], str):
            score = entry[1] if len(entry) > 1 and isinstance(entry[1], int | float) else None
            rows.append(MovedFeature(entry[0], None if score is None else float(score), ""))
            continue
        if not isinstance(entry, dict):
            continue
        name = next((str(entry[k]) for k in _NAME_KEYS if k in entry), "feature")
        key = next((k for k in _SCORE_KEYS if isinstance(entry.get(k), int | float)), None)
        score = float(entry[key]) if key is not None else None
        detail = ", ".join(
            f"{k.replace('_', ' ')} {v:.3g}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}"
            for k, v in entry.items()
            if k not in (*_NAME_KEYS, key) and isinstance(v, int | float | str) and not isinstance(v, bool)
        )
        detail = f"{key}; {detail}" if key and detail else (key or detail)
        rows.append(MovedFeature(name, score, detail[:200], trends.get(name)))
    scored = [(r.name, abs(r.score)) for r in rows if r.score is not None]  # bars: how far it moved
    chart = hbars([(n, float(s)) for n, s in scored], width=240) if scored else None
    return rows, chart


def _trends(blocks: list[DriftResult]) -> dict[str, LineChart]:
    """z per window of every component the monitor ranked among a window's top movers."""
    series: dict[str, list[float]] = {}
    for block in blocks:
        policy = (block.details or {}).get("policy")
        for entry in policy.get("top", []) if isinstance(policy, dict) else []:
            if isinstance(entry, dict) and isinstance(entry.get("z"), int | float):
                series.setdefault(str(entry.get("name")), []).append(float(entry["z"]))
    return {
        name: run_chart(values, limits=[("0", 0.0)], width=140, height=30)
        for name, values in series.items()
        if len(values) >= 2
    }


def _blocks(session: Session, alert: Alert) -> list[DriftResult]:
    """The monitor's latest windows of the alert's line (and camera), oldest first."""
    query = select(DriftResult).where(DriftResult.line_id == alert.line_id)
    if alert.camera_id is not None:
        query = query.where(DriftResult.camera_id == alert.camera_id)
    return list(session.scalars(query.order_by(DriftResult.id.desc()).limit(SPC_WINDOWS)))[::-1]


def _levels(details: dict[str, Any]) -> list[tuple[str, float]]:
    """Warning and critical levels of a drift result (the monitor keeps them under "policy")."""
    found_policy = details.get("policy")
    policy: dict[str, Any] = found_policy if isinstance(found_policy, dict) else {}
    found = []
    for name in ("warning", "critical"):
        value = policy.get(name, details.get(f"{name}_threshold", details.get(name)))
        if isinstance(value, int | float) and not isinstance(value, bool):
            found.append((name, float(value)))
    return found


def drift_chart(session: Session, alert: Alert) -> SpcChart | None:
    """The drift score of the alert's line (and camera), window by window, with its levels."""
    if alert.line_id is None:
        return None
    rows = _blocks(session, alert)
    if not rows:
        return None
    scores = [r.score for r in rows]
    limits = _levels(rows[-1].details or {})
    upper = min((v for _, v in limits), default=None)
    note = "drift score per window; lines mark the policy's warning and critical levels"
    if not limits:
        mean = sum(scores) / len(scores)
        sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / max(1, len(scores) - 1))
        upper = mean + 3 * sd
        limits = [("mean", mean), ("mean + 3σ", upper)]
        note = "drift score per window (individuals chart: mean and 3σ)"
    chart = run_chart(scores, limits=limits, upper=upper)
    return SpcChart("Drift score", chart, note, sum(1 for *_, out in chart.dots if out))


def _reference_chart(session: Session, alert: Alert, name: str) -> dict[str, Any] | None:
    """The monitor's calibrated p-chart ``name`` (centre and limits from the reference): from this
    alert when it is that chart's SPC alert, else from the newest such alert on the line."""
    chart = (alert.details or {}).get("chart")
    if alert.kind == "spc" and isinstance(chart, dict) and chart.get("chart") == name:
        return chart
    query = (
        select(Alert)
        .where(Alert.kind == "spc", Alert.line_id == alert.line_id)
        .order_by(Alert.id.desc())
        .limit(20)
    )
    for other in session.scalars(query):
        chart = (other.details or {}).get("chart")
        if isinstance(chart, dict) and chart.get("chart") == name:
            return chart
    return None


def rate_charts(session: Session, alert: Alert) -> list[SpcChart]:
    """p-charts of the defect and review rates: the monitor's subgroups (its windows' verdict
    counts) against the reference's limits when known; else consecutive windows of the line's
    parts against limits estimated from those windows."""
    if alert.line_id is None:
        return []
    blocks = [b for b in _blocks(session, alert) if isinstance((b.details or {}).get("spc"), dict)]
    series: dict[str, list[float]] = {}
    sizes: list[int] = []
    source = "the monitor's subgroups"
    if len(blocks) >= 2:
        sizes = [max(1, int(b.details["spc"].get("n", 0) or 0)) for b in blocks]
        for key in ("defect", "review"):
            series[key] = [
                int(b.details["spc"].get(key, 0) or 0) / m for b, m in zip(blocks, sizes, strict=True)
            ]
    else:
        n = alert.window_size or DEFAULT_WINDOW
        query = select(Prediction.verdict).where(Prediction.line_id == alert.line_id)
        if alert.camera_id is not None:
            query = query.where(Prediction.camera_id == alert.camera_id)
        verdicts = list(session.scalars(query.order_by(Prediction.id.desc()).limit(n * SPC_WINDOWS)))[::-1]
        windows = [verdicts[i : i + n] for i in range(len(verdicts) % n, len(verdicts), n)]
        if len(windows) < 2:
            return []
        sizes = [len(w) for w in windows]
        for key in ("defect", "review"):
            series[key] = [sum(v == key for v in w) / len(w) for w in windows]
        source = f"windows of {n} parts"
    m = sorted(sizes)[len(sizes) // 2]
    charts = []
    for key, title in (("defect", "Defect rate"), ("review", "Review rate")):
        rates = series[key]
        known = _reference_chart(session, alert, f"{key}_rate")
        if known is not None:
            p, lcl, ucl = float(known["center"]), float(known["lcl"]), float(known["ucl"])
            basis = "centre and limits from the reference"
        else:
            p = sum(rates) / len(rates)
            sigma = math.sqrt(p * (1 - p) / m)
            ucl, lcl = min(1.0, p + 3 * sigma), max(0.0, p - 3 * sigma)
            basis = "3σ limits estimated from these points"
        chart = run_chart(rates, limits=[("UCL", ucl), ("p̄", p), ("LCL", lcl)], upper=ucl, lower=lcl)
        charts.append(
            SpcChart(
                title,
                chart,
                f"p-chart of {len(rates)} subgroups ({source}, median {m} parts); {basis}",
                sum(1 for *_, out in chart.dots if out),
            )
        )
    return charts


def window_estimate(alert: Alert) -> dict[str, Any] | None:
    """The monitor's estimate of the QC figures in the alert's window, if it stored one."""
    estimate = (alert.details or {}).get("estimate")
    return estimate if isinstance(estimate, dict) else None


def report_file(alert: Alert, data_dir: Path) -> Path | None:
    """The alert's Evidently HTML report, only if it is a local file under the data dir."""
    uri = alert.report_uri
    if not uri:
        return None
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        return None  # a remote store: shown as a link text, not fetched by the console
    raw = Path(unquote(parsed.path) if parsed.scheme == "file" else uri)
    root = data_dir.resolve()
    # A relative path may be relative to the working directory (".kensa/reports/...") or to the
    # data dir; either way the file must lie under the data dir.
    candidates = [raw.resolve()] if raw.is_absolute() else [raw.resolve(), (root / raw).resolve()]
    for path in candidates:
        if path.is_relative_to(root) and path.suffix.lower() in (".html", ".htm") and path.is_file():
            return path
    return None
