"""The review queue: one part at a time, labelled with one key; the next part follows at once.

A part an anomaly model judged also gets its heatmap (key ``h``): drawn on demand by the served
anomaly model from the stored image (serving keeps the region, not the map), over the part image,
with the region the judging model cut outlined.
"""

from __future__ import annotations

import asyncio
from pathlib import Path as FilePath
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Form, Path, Query, Request
from starlette.responses import FileResponse, Response

from kensa.serving.console.charts import hbars
from kensa.serving.console.context import Console, console_of
from kensa.serving.console.heatmap import HeatmapUnavailable
from kensa.serving.console.queue import (
    AlreadyLabelled,
    QueueView,
    backlog,
    image_file,
    label_item,
    next_view,
    queue_lines,
    recent_labels,
)
from kensa.serving.console.web import ConsoleError, user_of
from kensa.serving.errors import ApiError
from kensa.serving.security.auth import CONSOLE_PREFIX, LABELLERS

router = APIRouter()

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".bmp": "image/bmp"}
LineQuery = Query(None, max_length=255, description="Only this line's parts.")
HEATMAP_KEY = "h"  # labels take 1-9 and u, zoom z


def _image_size(path: FilePath | None) -> tuple[int, int] | None:
    if path is None:
        return None
    from PIL import Image

    try:
        with Image.open(path) as img:  # the header only
            return int(img.width), int(img.height)
    except (OSError, ValueError):
        return None


def _where(finding: dict[str, Any]) -> str:
    """The stored region in words, in pixels of the image as sent."""
    region = finding.get("region")
    if not isinstance(region, dict):
        return "no region: the map reaches neither threshold of the band"
    b = region.get("image_box") or {}
    try:
        text = f"region x {int(b['x0'])}–{int(b['x1'])}, y {int(b['y0'])}–{int(b['y1'])} px"
    except (KeyError, TypeError, ValueError):
        return "a region (its box was not recorded)"
    area, threshold = region.get("area_fraction"), region.get("threshold")
    if isinstance(area, int | float):
        text += f", {100 * area:.1f} % of the model's view"
    return text + (f", above {threshold}" if isinstance(threshold, str) else "")


def _heat_view(console: Console, view: QueueView | None) -> dict[str, Any] | None:
    """What the page needs to offer a heatmap: only for a part an anomaly model judged."""
    if view is None or view.anomaly is None:
        return None
    item = view.item
    served = console.current_model() or {}
    size = _image_size(image_file(item, console.settings.images_dir))
    box = view.region_box
    score = view.anomaly.get("score")
    return {
        "url": f"{CONSOLE_PREFIX}/review/{item.id}/heatmap.png",
        "key": HEATMAP_KEY,
        "score": f"{score:.3f}" if isinstance(score, int | float) else "—",
        "where": _where(view.anomaly),
        "box": box if size is not None else None,
        "width": size[0] if size else None,
        "height": size[1] if size else None,
        "image_missing": size is None,
        "served_version": served.get("model_version"),
        "served_is_anomaly": served.get("kind") == "anomaly",
        "same_version": served.get("model_version") == item.model_version
        and served.get("model_name") == item.model_name,
    }


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
            "heat": _heat_view(console, view),
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


def _stored_image(console: Console, item_id: int) -> bytes:
    from kensa.store.models import ReviewItem

    with console.sessions() as session:
        item = session.get(ReviewItem, item_id)
    if item is None:
        raise ConsoleError(404, "unknown_review_item", f"review item {item_id} does not exist")
    path = image_file(item, console.settings.images_dir)
    try:
        if path is None:
            raise FileNotFoundError
        return path.read_bytes()
    except OSError:
        raise ConsoleError(
            404, "image_missing", f"the image of review item {item_id} is not in the image store"
        ) from None


@router.get("/review/{item_id}/heatmap.png")
async def heatmap(request: Request, item_id: int = Path(..., ge=1)) -> Response:
    """The served anomaly model's heatmap of the item's stored image, drawn now (maps are not
    stored): 404 for an unknown item or a missing image, 409 while a classifier is served."""
    console = console_of(request)
    data = await asyncio.to_thread(_stored_image, console, item_id)
    try:
        drawn = await console.draw_heatmap(data)
    except HeatmapUnavailable as exc:
        raise ConsoleError(exc.status, exc.code, exc.detail) from None
    except ApiError as exc:  # the stored file is no readable image (any more)
        raise ConsoleError(422, "image_unreadable", f"review item {item_id}: {exc.detail}") from None
    return Response(
        drawn.png,
        media_type="image/png",
        headers={"x-kensa-model-version": quote(drawn.model_version, safe="")},
    )
