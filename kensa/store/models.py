"""Tables of the kensa store: predictions, reviews, alerts, audit trail, API keys, costs, drift."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Allowed values of the string "enum" columns. They are CHECK constraints rather than native
# enums so that adding a value is a one-line migration on both SQLite and PostgreSQL.
VERDICTS: tuple[str, ...] = ("ok", "defect", "review")
REVIEW_REASONS: tuple[str, ...] = ("review_band", "drift", "sample")
REVIEW_STATUSES: tuple[str, ...] = ("open", "labelled", "skipped")
ALERT_LEVELS: tuple[str, ...] = ("warning", "critical")
ALERT_KINDS: tuple[str, ...] = ("drift", "spc", "model")
ALERT_STATUSES: tuple[str, ...] = ("open", "acknowledged", "escalated", "resolved")
DRIFT_LEVELS: tuple[str, ...] = ("none", "warning", "critical")
ROLES: tuple[str, ...] = ("line", "operator", "data-scientist", "auditor", "admin")

# Deterministic constraint names, so a later migration can drop or alter them by name.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY (a rowid alias),
# so the 64-bit key is BIGINT on PostgreSQL and INTEGER (also 64-bit there) on SQLite.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC (the only kind of timestamp the store accepts)."""
    return datetime.now(UTC)


def _in(column: str, values: tuple[str, ...]) -> str:
    quoted = ", ".join(f"'{v}'" for v in values)
    return f"{column} IN ({quoted})"


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python, on SQLite as on PostgreSQL.

    SQLite has no timezone type and hands back naive datetimes; this type stores UTC and re-attaches
    UTC on the way out. Naive datetimes are refused on the way in because their zone is a guess.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            msg = f"naive datetime {value!r}: the store accepts timezone-aware datetimes (use UTC)"
            raise ValueError(msg)
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base; every datetime column is a UTC-aware timestamp."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime()}


def _created_at() -> Mapped[datetime]:
    return mapped_column(default=utcnow, server_default=func.now(), nullable=False)


class Prediction(Base):
    """One verdict served for one image."""

    __tablename__ = "predictions"
    __table_args__ = (
        CheckConstraint(_in("verdict", VERDICTS), name="verdict"),
        # Drift windows and the console read "the latest predictions of a line".
        Index("ix_predictions_line_id_created_at", "line_id", "created_at"),
        Index("ix_predictions_model_name_model_version", "model_name", "model_version"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(64), unique=True)
    # A client retrying a POST sends the same key; the unique index turns the retry into a lookup.
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    image_sha256: Mapped[str] = mapped_column(String(64), index=True)
    model_name: Mapped[str] = mapped_column(String(255))
    model_version: Mapped[str] = mapped_column(String(64))
    verdict: Mapped[str] = mapped_column(String(16))
    defect_type: Mapped[str | None] = mapped_column(String(128))
    # Class name -> softmax probability.
    probs: Mapped[dict[str, float]] = mapped_column(JSON)
    # The model's low-dimensional drift projection of the embedding.
    features: Mapped[list[float] | None] = mapped_column(JSON)
    image_stats: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    latency_ms: Mapped[float] = mapped_column(Float)
    part_id: Mapped[str] = mapped_column(String(255))
    line_id: Mapped[str] = mapped_column(String(255))
    camera_id: Mapped[str | None] = mapped_column(String(255))
    image_path: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()


class Alert(Base):
    """A drift, SPC or model alert and its handling by an operator."""

    __tablename__ = "alerts"
    __table_args__ = (
        CheckConstraint(_in("level", ALERT_LEVELS), name="level"),
        CheckConstraint(_in("kind", ALERT_KINDS), name="kind"),
        CheckConstraint(_in("status", ALERT_STATUSES), name="status"),
        Index("ix_alerts_status_created_at", "status", "created_at"),
        Index("ix_alerts_line_id_created_at", "line_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    level: Mapped[str] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(16))
    cause: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="open", server_default="open")
    # Nullable: a model alert (e.g. a failed parity check) belongs to no line.
    line_id: Mapped[str | None] = mapped_column(String(255))
    camera_id: Mapped[str | None] = mapped_column(String(255))
    window_start: Mapped[datetime | None] = mapped_column()
    window_end: Mapped[datetime | None] = mapped_column()
    window_size: Mapped[int | None] = mapped_column(Integer)
    top_features: Mapped[list[Any]] = mapped_column(JSON, default=list)
    report_uri: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = _created_at()
    acknowledged_by: Mapped[str | None] = mapped_column(String(255))
    acknowledged_at: Mapped[datetime | None] = mapped_column()
    escalated_at: Mapped[datetime | None] = mapped_column()
    resolved_by: Mapped[str | None] = mapped_column(String(255))
    resolved_at: Mapped[datetime | None] = mapped_column()
    comment: Mapped[str | None] = mapped_column(Text)


class ReviewItem(Base):
    """A part waiting for (or given) a human label."""

    __tablename__ = "review_items"
    __table_args__ = (
        CheckConstraint(_in("reason", REVIEW_REASONS), name="reason"),
        CheckConstraint(_in("status", REVIEW_STATUSES), name="status"),
        # The operator's queue: open items, oldest first.
        Index("ix_review_items_status_created_at", "status", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    prediction_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("predictions.id"), index=True)
    image_path: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="open", server_default="open")
    label: Mapped[str | None] = mapped_column(String(128))
    labelled_by: Mapped[str | None] = mapped_column(String(255))
    labelled_at: Mapped[datetime | None] = mapped_column()
    model_name: Mapped[str] = mapped_column(String(255))
    model_version: Mapped[str] = mapped_column(String(64))
    probs: Mapped[dict[str, float]] = mapped_column(JSON)
    line_id: Mapped[str] = mapped_column(String(255), index=True)
    camera_id: Mapped[str | None] = mapped_column(String(255))
    alert_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("alerts.id"), index=True)
    created_at: Mapped[datetime] = _created_at()


class AuditEvent(Base):
    """One link of the tamper-evident audit trail (see kensa.store.audit for the hash recipe)."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, nullable=False, index=True)
    actor: Mapped[str] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(255))
    subject: Mapped[str] = mapped_column(String(255), index=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Unique: two events can never claim the same predecessor, so the chain cannot fork.
    prev_hash: Mapped[str] = mapped_column(String(64), unique=True)
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class ApiKey(Base):
    """An API key; only its sha256 is stored, with a short prefix so people can tell keys apart."""

    __tablename__ = "api_keys"
    __table_args__ = (CheckConstraint(_in("role", ROLES), name="role"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(32))
    prefix: Mapped[str] = mapped_column(String(32), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = _created_at()
    revoked_at: Mapped[datetime | None] = mapped_column()
    last_used_at: Mapped[datetime | None] = mapped_column()


class CostEntry(Base):
    """Device time and money spent by one stage of a flow run on one compute target."""

    __tablename__ = "cost_ledger"
    __table_args__ = (
        CheckConstraint("device_hours >= 0", name="device_hours_nonnegative"),
        CheckConstraint("cost >= 0", name="cost_nonnegative"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(255), index=True)
    stage: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(64))
    device_hours: Mapped[float] = mapped_column(Float)
    cost: Mapped[float] = mapped_column(Float)
    currency: Mapped[str] = mapped_column(String(3), default="USD", server_default="USD")
    created_at: Mapped[datetime] = _created_at()


class DriftResult(Base):
    """The drift score of one window of predictions on one line (and camera)."""

    __tablename__ = "drift_results"
    __table_args__ = (
        CheckConstraint(_in("level", DRIFT_LEVELS), name="level"),
        Index("ix_drift_results_line_id_camera_id_created_at", "line_id", "camera_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = _created_at()
    line_id: Mapped[str] = mapped_column(String(255))
    camera_id: Mapped[str | None] = mapped_column(String(255))
    window_size: Mapped[int] = mapped_column(Integer)
    window_start: Mapped[datetime] = mapped_column()
    window_end: Mapped[datetime] = mapped_column()
    score: Mapped[float] = mapped_column(Float)
    level: Mapped[str] = mapped_column(String(16))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    report_uri: Mapped[str | None] = mapped_column(Text)
