"""Admin routes: the model in service, and an immediate look at the champion alias."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from kensa.serving.errors import ApiError
from kensa.serving.routes.schemas import ErrorBody, ModelInfo, ReloadResult
from kensa.serving.state import principal, serving_state

router = APIRouter(tags=["admin"])


@router.get("/admin/model", response_model=ModelInfo, responses={503: {"model": ErrorBody}})
async def current_model(request: Request) -> dict[str, Any]:
    """The model in service: name, version, hash, thresholds, provider."""
    model = serving_state(request).models.current
    if model is None:
        raise ApiError(503, "no_model", "no verified model is loaded yet", headers={"Retry-After": "5"})
    return model.describe()


@router.post(
    "/admin/reload",
    response_model=ReloadResult,
    responses={409: {"model": ErrorBody}, 502: {"model": ErrorBody}},
)
async def reload(request: Request) -> dict[str, Any]:
    """Look at the champion (or the model file) now; verify and swap in a new version.

    A version that fails verification is refused (409) and the current one keeps serving.
    """
    state = serving_state(request)
    try:
        result = await state.models.check(actor=principal(request).actor)
    except ApiError:
        raise
    except Exception as exc:  # the registry is unreachable: say so, keep serving
        raise ApiError(
            502,
            "registry_unavailable",
            f"the model source cannot be read ({type(exc).__name__}); still serving",
        ) from exc
    if result.status == "refused":
        serving = (
            f"still serving version {result.serving.version}" if result.serving else "no model is serving"
        )
        version = result.candidate.version if result.candidate else "?"
        raise ApiError(409, "model_refused", f"version {version} was refused ({result.reason}); {serving}")
    return {"status": result.status, "model": result.serving.describe() if result.serving else None}
