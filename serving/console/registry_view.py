"""The Models page's reading of the MLflow registry: versions with their kensa tags and metrics,
their plots (run artifacts), side-by-side comparison, and the champion's history (audit trail)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from kensa.registry import (
    ALIAS_CHAMPION,
    TAG_CODE_VERSION,
    TAG_COST,
    TAG_DATASET_VERSION,
    TAG_KPI,
    TAG_PARITY,
    TAG_REGISTERED_BY,
    TAG_SHA256,
    TAG_SOURCE,
    TAG_STATUS,
    TAG_THRESHOLDS,
)
from kensa.settings import Settings
from kensa.store.models import AuditEvent

TAG_PREVIOUS_CHAMPION = "kensa.previous_champion"
# The sweep's parent run registers the model; the chosen trial's run holds its evaluation.
TAG_CHOSEN_RUN = "kensa.sweep.chosen_run"
MAX_VERSIONS = 50
PLOT_DIRS = ("plots",)


@dataclass(frozen=True)
class Measure:
    """One row of the comparison table (the same rows as ``kensa compare``)."""

    label: str
    metric: str  # MLflow metric name of the evaluation run
    tag_fallback: tuple[str, str] | None  # (tag, key) of the version's JSON tags
    kind: str  # "pct" | "ms" | "money" | "ratio"
    lower_is_better: bool = True


MEASURES: tuple[Measure, ...] = (
    Measure("escape rate", "test.escape_rate", ("kpi", "escape_rate"), "pct"),
    Measure("false reject rate", "test.false_reject_rate", None, "pct"),
    Measure("automation rate", "test.automation_rate", None, "pct", lower_is_better=False),
    Measure(
        "corrupted escape rate", "robustness.corrupted_escape_rate", ("kpi", "corrupted_escape_rate"), "pct"
    ),
    Measure("relative corruption error", "robustness.mean_relative_ce", None, "ratio"),
    Measure("latency per image", "latency_ms_per_image", None, "ms"),
    Measure("cost per million parts", "cost.serving_per_million", ("cost", "serving_per_million"), "money"),
    Measure("TCO", "cost.tco", ("cost", "tco"), "money"),
    Measure("parity max |Δp|", "parity_max_abs_diff", ("parity", "max_abs_prob_diff"), "ratio"),
)


@dataclass
class VersionView:
    name: str
    version: str
    aliases: list[str]
    status: str
    source: str
    registered_by: str
    created: datetime | None
    run_id: str | None
    tags: dict[str, str]
    kpi: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    eval_run_id: str | None = None

    @property
    def is_champion(self) -> bool:
        return ALIAS_CHAMPION in self.aliases

    @property
    def decidable(self) -> bool:
        return self.status not in ("rejected", "retired") and not self.is_champion

    def value(self, measure: Measure) -> float | None:
        if measure.metric in self.metrics:
            return self.metrics[measure.metric]
        if measure.tag_fallback:
            tag, key = measure.tag_fallback
            raw = getattr(self, tag).get(key)
            if isinstance(raw, int | float) and not isinstance(raw, bool):
                return float(raw)
        return None

    def card(self) -> list[tuple[str, str]]:
        """The model card: what the version is, where it came from, what it promises."""
        t = self.thresholds
        band = (
            f"ok below {t['t_ok']:.3f}, defect above {t['t_defect']:.3f} (defect score 1 − p(ok))"
            if isinstance(t.get("t_ok"), int | float) and isinstance(t.get("t_defect"), int | float)
            else "—"
        )
        guarantee = "—"
        if "alpha" in t:
            sure = "guaranteed" if t.get("guaranteed") else "not guaranteed (too few defective parts)"
            guarantee = (
                f"escape ≤ {float(t['alpha']):.1%} with confidence {1 - float(t.get('delta', 0)):.0%}: {sure}"
            )
        return [
            ("registered model", self.name),
            ("version", self.version),
            ("status", self.status or "—"),
            ("source", self.source or "—"),
            ("registered by", self.registered_by or "—"),
            ("registered", self.created.strftime("%Y-%m-%d %H:%M UTC") if self.created else "—"),
            ("dataset version", self.tags.get(TAG_DATASET_VERSION, "—") or "—"),
            ("code version", self.tags.get(TAG_CODE_VERSION, "—")),
            ("ONNX SHA-256", self.tags.get(TAG_SHA256, "—")),
            ("review band", band),
            ("escape guarantee", guarantee),
            ("replaced champion", self.tags.get(TAG_PREVIOUS_CHAMPION, "—")),
            ("MLflow run", self.run_id or "—"),
        ]


@dataclass(frozen=True)
class Plot:
    run_id: str
    path: str  # artifact path inside the run, e.g. plots/robustness_error.png

    @property
    def title(self) -> str:
        return Path(self.path).stem.replace("_", " ")


@dataclass(frozen=True)
class CompareRow:
    label: str
    kind: str
    a: float | None
    b: float | None
    better: str | None  # "a", "b" or None (equal or unknown)


def _json_tag(tags: dict[str, str], key: str) -> dict[str, Any]:
    try:
        value = json.loads(tags.get(key, "") or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class RegistryView:
    """Read-only views of one registered model (``Settings.registry_name``)."""

    def __init__(self, settings: Settings) -> None:
        from mlflow import MlflowClient  # heavy import, only when the Models page is used

        self.settings = settings
        self.name = settings.registry_name
        uri = settings.resolved_mlflow_uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.cache_dir = settings.data_dir / "console" / "artifacts"

    def versions(self) -> list[VersionView]:
        from mlflow.exceptions import MlflowException

        quoted = self.name.replace("'", "\\'")
        try:
            found = self.client.search_model_versions(f"name = '{quoted}'", max_results=MAX_VERSIONS)
        except MlflowException:
            return []
        views = [self._view(mv, with_metrics=False) for mv in found]
        # Searches do not fill in aliases on every tracking store; the registered model has them.
        try:
            aliases = dict(self.client.get_registered_model(self.name).aliases or {})
        except MlflowException:
            aliases = {}
        for view in views:
            view.aliases = sorted(
                set(view.aliases) | {a for a, v in aliases.items() if str(v) == view.version}
            )
        return sorted(views, key=lambda v: int(v.version) if v.version.isdigit() else 0, reverse=True)

    def version(self, version: str, *, with_metrics: bool = True) -> VersionView:
        """One version; ``LookupError`` when the registry does not have it."""
        from mlflow.exceptions import MlflowException

        if not version.isdigit() or len(version) > 12:
            raise LookupError(f"model version {version[:20]!r} is not a version number")
        try:
            mv = self.client.get_model_version(self.name, version)
        except MlflowException:
            raise LookupError(f"{self.name} has no version {version}") from None
        return self._view(mv, with_metrics=with_metrics)

    def _view(self, mv: Any, *, with_metrics: bool) -> VersionView:
        tags = dict(mv.tags or {})
        created = datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC) if mv.creation_timestamp else None
        view = VersionView(
            name=mv.name,
            version=str(mv.version),
            aliases=sorted(getattr(mv, "aliases", None) or []),
            status=tags.get(TAG_STATUS, ""),
            source=tags.get(TAG_SOURCE, ""),
            registered_by=tags.get(TAG_REGISTERED_BY, ""),
            created=created,
            run_id=mv.run_id or None,
            tags=tags,
            kpi=_json_tag(tags, TAG_KPI),
            cost=_json_tag(tags, TAG_COST),
            parity=_json_tag(tags, TAG_PARITY),
            thresholds=_json_tag(tags, TAG_THRESHOLDS),
        )
        if with_metrics and view.run_id:
            self._add_metrics(view)
        return view

    def _add_metrics(self, view: VersionView) -> None:
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(str(view.run_id))
        except MlflowException:
            return
        view.metrics = dict(run.data.metrics)
        chosen = run.data.tags.get(TAG_CHOSEN_RUN)
        if chosen:
            try:
                trial = self.client.get_run(chosen)
            except MlflowException:
                return
            view.eval_run_id = chosen
            view.metrics.update(trial.data.metrics)

    def plots(self, view: VersionView) -> list[Plot]:
        """PNG plots logged with the version's run and its evaluation run (never SVG/HTML)."""
        from mlflow.exceptions import MlflowException

        found: list[Plot] = []
        for run_id in dict.fromkeys(r for r in (view.run_id, view.eval_run_id) if r):
            for folder in PLOT_DIRS:
                try:
                    entries = self.client.list_artifacts(run_id, folder)
                except (MlflowException, OSError):
                    continue
                found += [Plot(run_id, e.path) for e in entries if not e.is_dir and e.path.endswith(".png")]
        return found

    def plot_file(self, view: VersionView, path: str) -> Path:
        """The local copy of one of ``plots(view)``; ``LookupError`` for anything else."""
        match = next((p for p in self.plots(view) if p.path == path), None)
        if match is None:
            raise LookupError(f"version {view.version} has no plot {path[:100]!r}")
        target = self.cache_dir / match.run_id / match.path
        if not target.is_file():
            staging = self.cache_dir / ".staging" / match.run_id
            local = Path(self.client.download_artifacts(match.run_id, match.path, str(staging)))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(local), target)
        return target

    def champion(self) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(self.name, ALIAS_CHAMPION).version)
        except MlflowException:
            return None


def compare(a: VersionView, b: VersionView) -> list[CompareRow]:
    rows = []
    for m in MEASURES:
        va, vb = a.value(m), b.value(m)
        better = None
        if va is not None and vb is not None and va != vb:
            better = "a" if (va < vb) == m.lower_is_better else "b"
        rows.append(CompareRow(m.label, m.kind, va, vb, better))
    return rows


def history(session: Session, name: str, limit: int = 20) -> list[AuditEvent]:
    """Registry decisions and swaps of ``name``, newest first, from the audit trail."""
    query = (
        select(AuditEvent)
        .where(
            AuditEvent.subject.like(f"model:{name}/%"),
            AuditEvent.action.in_(
                (
                    "model.register",
                    "model.approve",
                    "model.reject",
                    "model.rollback",
                    "model.serve",
                    "model.refuse",
                )
            ),
        )
        .order_by(AuditEvent.id.desc())
        .limit(limit)
    )
    return list(session.scalars(query))
