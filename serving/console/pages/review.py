"""The review queue: one part at a time, labelled with one key; the next part follows at once."""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import APIRouter, Form, Path, Query, Request
from starlette.responses import FileResponse, Response

from kensa.serving.console.charts import hbars
from kensa.serving.console.context import console_of
from kensa.serving.console.queue import (
    AlreadyLabelled,
    backlog,
    image_file,
    label_item,
    next_view,
    queue_lines,
    recent_labels,
)
from kensa.serving.console.web import ConsoleError, user_of
from kensa.serving.security.auth import CONSOLE_PREFIX, LABELLERS

router = APIRouter()

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".bmp": "image/bmp"}
LineQuery = Query(None, max_length=255, description="Only this line's parts.")


def _queue_url(line: str | None) -> str:
    return f"{CONSOLE_PREFIX}/review" + (f"?{urlencode({'line': line})}" if line else "")


@router.get("/review")
def review_page(request: Request, line: str | None = LineQuery) -> Response:
    console = console_of(request)
    user = user_of(request)
    with console.sessions() as session:
        view = next_view(session, line_id=line)
        waiting, oldest = backlog(session, line_id=line)
        lines = queue_lines(session)
        mine = recent_labels(session, by=user.actor)
    chart = hbars(view.probs, width=220, fmt="{:.3f}") if view else None
    return console.pages.render(
        request,
        "review.html",
        {
            "nav": "review",
            "view": view,
            "chart": chart,
            "waiting": waiting,
            "oldest": oldest,
            "lines": lines,
            "line": line,
            "recent": mine,
            "can_label": user.role in LABELLERS,
            "queue_url": _queue_url(line),
        },
    )


@router.post("/review/{item_id}/label")
def label(
    request: Request,
    item_id: int = Path(..., ge=1),
    label: str = Form(..., min_length=1, max_length=128),
    line: str | None = LineQuery,
) -> Response:
    console = console_of(request)
    user = user_of(request)
    with console.sessions() as session:
        try:
            item = label_item(session, item_id, label=label, by=user.actor, actor_key_id=user.key_id)
        except LookupError as exc:
            raise ConsoleError(404, "unknown_review_item", str(exc)) from None
        except AlreadyLabelled as exc:
            session.rollback()
            return console.pages.redirect(
                request, _queue_url(line), ("warn", f"{exc}; here is the next part.")
            )
        except ValueError as exc:
            raise ConsoleError(422, "invalid_label", str(exc)) from None
        session.commit()
    done = "set aside as unsure" if item.status == "skipped" else f"labelled {item.label}"
    return console.pages.redirect(request, _queue_url(line), ("ok", f"Part {item_id} {done}."))


@router.get("/review/{item_id}/image")
def image(request: Request, item_id: int = Path(..., ge=1)) -> Response:
    from kensa.store.models import ReviewItem

    console = console_of(request)
    with console.sessions() as session:
        item = session.get(ReviewItem, item_id)
    if item is None:
        raise ConsoleError(404, "unknown_review_item", f"review item {item_id} does not exist")
    path = image_file(item, console.settings.images_dir)
    if path is None or path.suffix.lower() not in IMAGE_TYPES:
        raise ConsoleError(
            404, "image_missing", f"the image of review item {item_id} is not in the image store"
        )
    return FileResponse(path, media_type=IMAGE_TYPES[path.suffix.lower()])
