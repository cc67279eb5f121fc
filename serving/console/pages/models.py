"""Models: candidates with their evidence (KPIs, plots, cost, parity, model card), side-by-side
comparison, approve / reject / roll back under the project's approval policy, champion history."""

from __future__ import annotations

import asyncio
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Path, Query, Request
from starlette.responses import FileResponse, Response

from kensa.serving.console.context import console_of
from kensa.serving.console.decisions import DecisionError, PolicyError, decide, load_policy, may_decide
from kensa.serving.console.registry_view import MEASURES, compare, history
from kensa.serving.console.web import ConsoleError, user_of
from kensa.serving.security.auth import CONSOLE_PREFIX, DECIDERS

router = APIRouter()

VersionPath = Path(..., min_length=1, max_length=12, pattern=r"^[0-9]+$")
ReasonForm = Form("", max_length=1000)


def _policy_context(request: Request, role: str) -> dict[str, object]:
    settings = console_of(request).settings
    try:
        policy = load_policy(settings)
    except PolicyError as exc:
        return {"policy": None, "policy_error": str(exc), "may_decide": False}
    return {
        "policy": policy,
        "policy_error": None,
        "may_decide": role in DECIDERS and may_decide(role, policy),
    }


@router.get("/models")
def models_page(request: Request) -> Response:
    console = console_of(request)
    user = user_of(request)
    registry = console.registry
    versions = registry.versions()
    # The evidence table needs each version's runs: only for the ones a person decides on now.
    shown = [v for v in versions if v.status == "candidate" or "candidate" in v.aliases or v.is_champion][:6]
    detailed = [registry.version(v.version) for v in shown]
    with console.sessions() as session:
        events = history(session, registry.name)
    return console.pages.render(
        request,
        "models.html",
        {
            "nav": "models",
            "name": registry.name,
            "versions": versions,
            "detailed": detailed,
            "measures": MEASURES,
            "events": events,
            "champion": next((v for v in versions if v.is_champion), None),
            "serving": console.current_model(),
            **_policy_context(request, user.role),
        },
    )


@router.get("/models/compare")
def compare_page(
    request: Request,
    a: str = Query(..., max_length=12, pattern=r"^[0-9]+$"),
    b: str = Query(..., max_length=12, pattern=r"^[0-9]+$"),
) -> Response:
    console = console_of(request)
    registry = console.registry
    try:
        va, vb = registry.version(a), registry.version(b)
    except LookupError as exc:
        raise ConsoleError(404, "unknown_version", str(exc)) from None
    return console.pages.render(
        request,
        "compare.html",
        {"nav": "models", "a": va, "b": vb, "rows": compare(va, vb), "versions": registry.versions()},
    )


@router.get("/models/{version}")
def version_page(request: Request, version: str = VersionPath) -> Response:
    console = console_of(request)
    user = user_of(request)
    registry = console.registry
    try:
        view = registry.version(version)
    except LookupError as exc:
        raise ConsoleError(404, "unknown_version", str(exc)) from None
    champion = registry.champion()
    return console.pages.render(
        request,
        "model.html",
        {
            "nav": "models",
            "v": view,
            "measures": MEASURES,
            "plots": registry.plots(view),
            "champion": champion,
            "compare_url": f"{CONSOLE_PREFIX}/models/compare?{urlencode({'a': champion, 'b': view.version})}"
            if champion and champion != view.version
            else None,
            **_policy_context(request, user.role),
        },
    )


@router.get("/models/{version}/artifacts/{path:path}")
def plot(request: Request, version: str = VersionPath, path: str = "") -> Response:
    console = console_of(request)
    registry = console.registry
    try:
        view = registry.version(version, with_metrics=True)
        local = registry.plot_file(view, path)
    except LookupError as exc:
        raise ConsoleError(404, "unknown_plot", str(exc)) from None
    return FileResponse(local, media_type="image/png")


async def _decide(request: Request, action: str, version: str | None, reason: str) -> Response:
    console = console_of(request)
    user = user_of(request)
    if not reason.strip():
        raise ConsoleError(
            422, "reason_required", f"say why you {action} (the reason goes into the audit trail)"
        )
    kwargs: dict[str, object] = {"by": user.actor, "role": user.role, "reason": reason.strip()}
    if version is not None:
        kwargs.update(name=console.registry.name, version=version)
    else:
        kwargs.update(name=console.registry.name)
    try:
        outcome = await asyncio.to_thread(decide, action, console.settings, **kwargs)
    except DecisionError as exc:
        raise ConsoleError(exc.status, exc.code, exc.detail) from None
    # The alias moved: have this replica look now (the others follow on their next poll).
    serving = await console.refresh_champion(user.actor) if action in ("approve", "rollback") else ""
    if action == "approve":
        message = f"Version {version} approved: it is the champion now"
        target = f"{CONSOLE_PREFIX}/models/{version}"
    elif action == "reject":
        message = f"Version {version} rejected"
        target = f"{CONSOLE_PREFIX}/models/{version}"
    else:
        old, new = outcome
        message = f"Champion rolled back from version {old} to {new}"
        target = f"{CONSOLE_PREFIX}/models"
    return console.pages.redirect(
        request, target, ("ok", f"{message}; {serving}." if serving else f"{message}.")
    )


@router.post("/models/{version}/approve")
async def approve(request: Request, version: str = VersionPath, reason: str = ReasonForm) -> Response:
    return await _decide(request, "approve", version, reason)


@router.post("/models/{version}/reject")
async def reject(request: Request, version: str = VersionPath, reason: str = ReasonForm) -> Response:
    return await _decide(request, "reject", version, reason)


@router.post("/models/rollback")
async def rollback(request: Request, reason: str = ReasonForm) -> Response:
    return await _decide(request, "rollback", None, reason)
