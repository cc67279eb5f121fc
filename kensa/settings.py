"""The one settings object every kensa entry point builds once and passes down."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The synthetic line's label set; a user's own line configures its own (KENSA_CLASSES).
DEFAULT_CLASSES: tuple[str, ...] = (
    "ok",
    "defect_scratch",
    "defect_dent",
    "defect_stain",
    "defect_missing_hole",
    "defect_crack",
)


class Settings(BaseSettings):
    """Everything configurable in kensa, read from ``KENSA_*`` environment variables.

    Build it once at an entry point (``Settings()``) and pass it down; no other module reads the
    environment. Empty URLs mean "the embedded default under ``data_dir``".
    """

    model_config = SettingsConfigDict(env_prefix="KENSA_", env_file=None, extra="ignore")

    data_dir: Path = Field(Path(".kensa"), description="Where embedded stores and artifacts live.")
    store_url: str = Field("", description="SQLAlchemy URL of the store; empty = SQLite in data_dir.")
    mlflow_tracking_uri: str = Field("", description="MLflow tracking URI; empty = SQLite in data_dir.")
    prefect_api_url: str = Field("", description="Prefect API URL; empty = embedded ephemeral API.")
    project_config: Path | None = Field(None, description="Path of kensa.toml (project config).")

    # Dataset rules (ingestion).
    # NoDecode: the env source would parse a tuple as JSON and fail on the documented form
    # KENSA_CLASSES=ok,defect_a,defect_b before _split_classes could see it.
    classes: Annotated[tuple[str, ...], NoDecode] = Field(
        DEFAULT_CLASSES, description="Accepted labels; 'ok' first."
    )
    min_images_per_class: int = Field(5, ge=1)
    split_fractions: tuple[float, float, float] = Field(
        (0.6, 0.2, 0.2), description="train, calibration, test fractions (grouped by part id)."
    )
    split_seed: int = 0

    # Registry: where flows put models and serving finds the champion.
    registry_name: str = Field("kensa-qc", description="MLflow registered model name.")

    # Serving.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_batch_size: int = Field(16, ge=1, le=1024)
    max_wait_ms: float = Field(4.0, ge=0, description="Longest a request waits to fill a batch.")
    queue_size: int = Field(512, ge=1, description="Bounded queue; beyond it requests get 503.")
    request_timeout_s: float = Field(10.0, gt=0, description="Per-request deadline (504).")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(40_000_000, ge=1, description="Decompression-bomb guard.")
    decode_threads: int = Field(2, ge=1)
    inference_runners: int = Field(
        0,
        ge=0,
        le=8,
        description="Batches in inference at once; 0 = chosen per model from its warm-up timing "
        "(2 for a model slower than 6 ms per image, else 1).",
    )
    sample_rate: float = Field(0.02, ge=0, le=1, description="Share of non-review images stored.")
    champion_poll_s: float = Field(10.0, gt=0, description="How often serving checks the alias.")
    drain_s: float = Field(
        2.0, ge=0, description="After SIGTERM, how long readiness answers 503 before serving stops."
    )
    session_secret: str = Field("", description="Console cookie signing key; empty = generated.")

    # Monitoring: drift windows, the false-alarm budget, escalation of unhandled critical alerts.
    drift_window: int = Field(200, ge=20, description="Parts per drift window (count windows).")
    drift_window_s: float = Field(
        3600.0, gt=0, description="Length of a time window in seconds (time windows)."
    )
    false_alarm_per_10k: float = Field(
        1.0, gt=0, description="Drift alerts allowed per 10,000 in-distribution parts."
    )
    escalate_after_s: float = Field(
        900.0, ge=0, description="An unacknowledged critical alert escalates after this long."
    )
    webhook_url: str = Field("", description="Where escalations are POSTed; empty = no webhook.")
    webhook_secret: SecretStr = Field(
        SecretStr(""), description="HMAC-SHA256 key signing escalation payloads."
    )
    webhook_attempts: int = Field(4, ge=1, le=10, description="Tries per escalation webhook.")
    webhook_backoff_s: float = Field(0.5, ge=0, description="First retry delay; doubles each try.")

    log_level: str = "INFO"
    log_format: Literal["auto", "json", "text"] = Field(
        "auto",
        description="Log lines as JSON objects, or as key=value text; auto: text on a terminal, "
        "JSON everywhere else (containers, files, pipes).",
    )

    @field_validator("classes", mode="before")
    @classmethod
    def _split_classes(cls, value: object) -> object:
        # Allow KENSA_CLASSES=ok,defect_a,defect_b besides a JSON list.
        if isinstance(value, str) and not value.lstrip().startswith("["):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        if isinstance(value, str):
            return json.loads(value)
        return value

    @field_validator("classes")
    @classmethod
    def _ok_first(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or value[0] != "ok" or len(set(value)) != len(value) or len(value) < 2:
            msg = f"classes must start with 'ok', be unique and name at least one defect; got {value}"
            raise ValueError(msg)
        return value

    @field_validator("split_fractions")
    @classmethod
    def _fractions_sum_to_one(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f <= 0 for f in value) or abs(sum(value) - 1.0) > 1e-6:
            msg = f"split_fractions must be three positive numbers summing to 1; got {value}"
            raise ValueError(msg)
        return value

    @cached_property
    def resolved_store_url(self) -> str:
        return self.store_url or f"sqlite:///{(self.data_dir / 'kensa.db').resolve()}"

    @cached_property
    def resolved_mlflow_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{(self.data_dir / 'mlflow.db').resolve()}"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def images_dir(self) -> Path:
        """Content-addressed images kept for review and retraining."""
        return self.data_dir / "images"

    @property
    def prefect_home(self) -> Path:
        return self.data_dir / "prefect"

    def ensure_dirs(self) -> None:
        """Create the embedded-default folders (idempotent)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
