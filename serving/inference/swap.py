"""Hot swap: follow the registry's ``champion`` alias (or one file), verify, then swap atomically.

A new version is downloaded, verified and warmed up off the event loop while the old one keeps
serving; publishing it is one reference assignment, so a batch already running finishes on the
model it started with and every answer names the version that judged it. A version that fails
verification is refused once, with an alert and an audit event, and the old one keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sqlalchemy.orm import Session, sessionmaker

from kensa.registry import ALIAS_CHAMPION, ONNX_FILE, TAG_SHA256
from kensa.serving.inference.artifact import ModelRefused, file_sha256
from kensa.serving.inference.engine import ServedModel, load_model
from kensa.serving.metrics import Metrics
from kensa.store.audit import append_event
from kensa.store.models import Alert

log = logging.getLogger("kensa.serving.swap")


@dataclass(frozen=True)
class Candidate:
    """A model version a source points at now (not yet downloaded or verified)."""

    name: str
    version: str
    expected_sha256: str | None


class ModelSource(Protocol):
    """Where the model to serve comes from."""

    def resolve(self) -> Candidate | None: ...

    def fetch(self, candidate: Candidate) -> Path: ...


class FileSource:
    """One ONNX file, no registry: version ``file:<sha256[:12]>`` (changes when the file does)."""

    def __init__(self, path: Path) -> None:
        self.path = path.resolve()

    def resolve(self) -> Candidate | None:
        if not self.path.is_file():
            return None
        return Candidate(self.path.stem, f"file:{file_sha256(self.path)[:12]}", None)

    def fetch(self, candidate: Candidate) -> Path:
        return self.path


class RegistrySource:
    """The ``champion`` alias of a registered model in MLflow; files cached under ``cache_dir``."""

    def __init__(self, tracking_uri: str, name: str, cache_dir: Path) -> None:
        from mlflow import MlflowClient  # heavy import, only in registry mode

        self.tracking_uri = tracking_uri
        self.name = name
        self.cache_dir = cache_dir
        self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        # MLflow draws progress bars on stderr for downloads; they would break the log format.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    def resolve(self) -> Candidate | None:
        from mlflow.exceptions import MlflowException

        try:
            mv = self._client.get_model_version_by_alias(self.name, ALIAS_CHAMPION)
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code) or "not found" in str(exc).lower():
                return None  # no model registered yet, or no champion chosen
            raise
        return Candidate(self.name, str(mv.version), (mv.tags or {}).get(TAG_SHA256))

    def fetch(self, candidate: Candidate) -> Path:
        from mlflow.artifacts import download_artifacts

        target = self.cache_dir / candidate.name / candidate.version
        onnx_path = target / ONNX_FILE
        if not onnx_path.is_file():
            partial = target.with_name(target.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            # The version's own artifact location, not a models:/ URI: MLflow resolves those
            # through its process-global registry URI, which may point elsewhere.
            location = self._client.get_model_version_download_uri(candidate.name, candidate.version)
            local = download_artifacts(
                artifact_uri=location,
                dst_path=str(partial),
                tracking_uri=self.tracking_uri,
                registry_uri=self.tracking_uri,
            )
            # A directory download lands in a subfolder named after the remote one.
            found = sorted(Path(local).rglob(ONNX_FILE)) if Path(local).is_dir() else []
            shutil.rmtree(target, ignore_errors=True)
            if found:
                found[0].parent.rename(target)
            shutil.rmtree(partial, ignore_errors=True)
        if not onnx_path.is_file():
            raise ModelRefused("download", f"the model version has no {ONNX_FILE} artifact")
        return onnx_path


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one look at the source."""

    status: str  # unchanged | swapped | refused | none
    serving: ServedModel | None
    candidate: Candidate | None = None
    reason: str | None = None


class ModelManager:
    """Holds the model in service and replaces it when the source points elsewhere."""

    def __init__(
        self,
        source: ModelSource,
        sessions: sessionmaker[Session],
        metrics: Metrics,
        *,
        max_batch: int,
        cache_dir: Path | None,
        runners: int = 0,
    ) -> None:
        self.source = source
        self._sessions = sessions
        self._metrics = metrics
        self._max_batch = max_batch
        self._cache_dir = cache_dir
        self._runners = runners
        self._current: ServedModel | None = None
        self._refused: dict[tuple[str, str], str] = {}
        self._lock = asyncio.Lock()

    @property
    def current(self) -> ServedModel | None:
        return self._current

    async def check(self, actor: str = "serving") -> CheckResult:
        """Look at the source once; verify and swap in a new version, or refuse it."""
        async with self._lock:
            candidate = await asyncio.to_thread(self.source.resolve)
            if candidate is None:
                return CheckResult("none", self._current)
            current = self._current
            if current is not None and (current.name, current.version) == (
                candidate.name,
                candidate.version,
            ):
                return CheckResult("unchanged", current, candidate)
            key = (candidate.name, candidate.version)
            if key in self._refused:
                return CheckResult("refused", current, candidate, self._refused[key])
            try:
                model = await asyncio.to_thread(self._load, candidate)
            except ModelRefused as exc:
                self._refused[key] = str(exc)
                self._metrics.refusals.labels(exc.step).inc()
                await asyncio.to_thread(self._record_refusal, candidate, exc, actor)
                return CheckResult("refused", current, candidate, str(exc))
            self._publish(model)
            await asyncio.to_thread(self._record_swap, model, current, actor)
            return CheckResult("swapped", model, candidate)

    def _load(self, candidate: Candidate) -> ServedModel:
        path = self.source.fetch(candidate)
        return load_model(
            path,
            name=candidate.name,
            version=candidate.version,
            expected_sha256=candidate.expected_sha256,
            max_batch=self._max_batch,
            cache_dir=self._cache_dir,
            runners=self._runners,
        )

    def _publish(self, model: ServedModel) -> None:
        # One reference assignment: batches read it once when they start (see Batcher._loop).
        old = self._current
        self._current = model
        if old is not None:
            self._metrics.model_info.remove(old.name, old.version, old.provider, old.precision)
        self._metrics.model_info.labels(model.name, model.version, model.provider, model.precision).set(1)
        self._metrics.swaps.inc()
        log.info(
            "model_swapped",
            extra={
                "model_name": model.name,
                "model_version": model.version,
                "previous_version": old.version if old else None,
                "provider": model.provider,
                "precision": model.precision,
            },
        )

    def _record_swap(self, model: ServedModel, previous: ServedModel | None, actor: str) -> None:
        with self._sessions() as session:
            append_event(
                session,
                actor=actor,
                action="model.serve",
                subject=f"model:{model.name}/{model.version}",
                details={
                    "sha256": model.sha256,
                    "provider": model.provider,
                    "precision": model.precision,
                    "previous_version": previous.version if previous else None,
                },
            )
            session.commit()

    def _record_refusal(self, candidate: Candidate, exc: ModelRefused, actor: str) -> None:
        current = self._current
        still = f"still serving version {current.version}" if current else "no model is serving"
        log.warning(
            "model_refused",
            extra={
                "model_name": candidate.name,
                "model_version": candidate.version,
                "step": exc.step,
                "reason": exc.reason,
            },
        )
        with self._sessions() as session:
            session.add(
                Alert(
                    level="critical",
                    kind="model",
                    cause=f"model {candidate.name} version {candidate.version} refused at "
                    f"{exc.step}: "
                    f"{exc.reason}; {still}",
                    details={
                        "model_name": candidate.name,
                        "model_version": candidate.version,
                        "step": exc.step,
                        "reason": exc.reason,
                        "serving_version": current.version if current else None,
                    },
                )
            )
            append_event(
                session,
                actor=actor,
                action="model.refuse",
                subject=f"model:{candidate.name}/{candidate.version}",
                details={
                    "step": exc.step,
                    "reason": exc.reason,
                    "serving_version": current.version if current else None,
                },
            )
            session.commit()

    async def watch(self, interval_s: float) -> None:
        """Poll the source forever; errors reaching the registry are logged, never fatal."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # registry down, network blip: keep serving, try again later
                log.warning("champion_poll_failed", extra={"error": type(exc).__name__})
