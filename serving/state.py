"""What the routes of one app share: settings, pipeline, model manager, metrics, readiness."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from kensa.serving.errors import ApiError
from kensa.serving.inference.service import InspectionService
from kensa.serving.inference.swap import ModelManager
from kensa.serving.metrics import Metrics
from kensa.serving.security.auth import Principal
from kensa.settings import Settings

# Longest accepted caller-supplied id (the store's columns are 255 characters).
MAX_ID_CHARS = 255
# Idempotency keys get "#<index>" appended for multi-image requests; keep room for it.
MAX_KEY_CHARS = 200


@dataclass
class ServingState:
    """Attached to ``app.state.kensa`` for the app's lifetime."""

    settings: Settings
    metrics: Metrics
    models: ModelManager
    service: InspectionService
    draining: bool = False

    @property
    def ready(self) -> bool:
        return self.models.current is not None and not self.draining


def serving_state(request: Request) -> ServingState:
    state: ServingState = request.app.state.kensa
    return state


def principal(request: Request) -> Principal:
    found: Principal | None = getattr(request.state, "principal", None)
    if found is None:  # AuthMiddleware sets it on every non-public route
        raise ApiError(401, "missing_api_key", "send an API key as 'Authorization: Bearer <key>'")
    return found


def clean_id(name: str, value: str | None) -> str | None:
    """A caller-supplied id, checked: printable, at most MAX_ID_CHARS; empty means absent."""
    if value is None or value == "":
        return None
    limit = MAX_KEY_CHARS if name == "Idempotency-Key" else MAX_ID_CHARS
    if len(value) > limit:
        raise ApiError(
            422, "invalid_field", f"{name} is {len(value)} characters; at most {limit} are accepted"
        )
    if not value.isprintable():
        raise ApiError(422, "invalid_field", f"{name} contains control characters; send printable text")
    return value
