"""``POST /v1/inspect`` and ``/v1/inspect/batch``: images in, verdicts (with model version) out."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Header, Query, Request
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException

from kensa.serving.errors import ACCEPTED_FORMATS, ApiError
from kensa.serving.inference.predlog import Answer, describe
from kensa.serving.inference.service import ImageInput, InspectionService, PartInfo
from kensa.serving.routes.schemas import BatchResult, ErrorBody, InspectResult
from kensa.serving.state import ServingState, clean_id, serving_state

router = APIRouter(tags=["inspect"])

RAW_TYPES = ("image/jpeg", "image/png", "image/bmp")
# Most images one batch request may carry; more would hold the queue for one caller.
MAX_BATCH_IMAGES = 64

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 413, 415, 422, 503, 504)
}
_ID_FIELDS = {
    "part_id": {"type": "string", "maxLength": 255},
    "line_id": {"type": "string", "maxLength": 255},
    "camera_id": {"type": "string", "maxLength": 255},
}
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_SINGLE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {"image": {"type": "string", "format": "binary"}, **_ID_FIELDS},
                }
            },
            **{t: _BINARY for t in RAW_TYPES},
        },
    }
}
_BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "maxItems": MAX_BATCH_IMAGES,
                        },
                        "part_id": {
                            "type": "array",
                            "items": {"type": "string", "maxLength": 255},
                            "description": "One per image, in order (optional).",
                        },
                        "line_id": _ID_FIELDS["line_id"],
                        "camera_id": _ID_FIELDS["camera_id"],
                    },
                }
            }
        },
    }
}


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def _form(request: Request, max_files: int) -> FormData:
    try:
        # One optional part_id per image, plus the few shared text fields (line_id, camera_id).
        return await request.form(max_files=max_files, max_fields=max_files + 8)
    except MultiPartException as exc:
        raise ApiError(400, "bad_multipart", f"the multipart body cannot be parsed ({exc})") from exc


def _text_field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if value is None or isinstance(value, str):
        return clean_id(name, value)
    raise ApiError(422, "invalid_field", f"form field '{name}' must be text, not a file")


async def _files(form: FormData, name: str) -> list[bytes]:
    values = form.getlist(name)
    if not values:
        got = ", ".join(sorted(set(form.keys()))) or "none"
        raise ApiError(
            422,
            "missing_image",
            f"multipart field '{name}' with a {ACCEPTED_FORMATS} file is required; got fields: {got}",
        )
    out = []
    for value in values:
        if not isinstance(value, UploadFile):
            raise ApiError(422, "missing_image", f"multipart field '{name}' must be a file upload, not text")
        out.append(await value.read())
    return out


_HEATMAP = Query(
    False,
    description=(
        "Anomaly models only: add the map as a PNG heatmap over the part, base64 in "
        "anomaly.heatmap_png. A classifier has no map: asking is a 422."
    ),
)


def _check_heatmap(state: ServingState, heatmap: bool) -> None:
    """Refuse a heatmap before reading the body when the model in service has no map to draw."""
    model = state.models.current
    if heatmap and model is not None and not model.spec.is_anomaly:
        raise ApiError(
            422,
            "heatmap_unavailable",
            f"heatmap=true needs an anomaly model (one with an anomaly_map output); the model in "
            f"service, {model.name!r} version {model.version!r}, is a {model.spec.kind}: send "
            "heatmap=false or leave it out",
        )


async def _body(service: InspectionService, answer: Answer, heatmap: bool) -> dict[str, Any]:
    body = describe(answer)
    if heatmap and "anomaly" in body:
        body["anomaly"]["heatmap_png"] = await service.heatmap_png(answer)
    return body


def _unsupported_media(media: str, multipart_field: str) -> ApiError:
    return ApiError(
        415,
        "unsupported_media_type",
        f"Content-Type {media or 'missing'!r} is not accepted; send multipart/form-data with a "
        f"'{multipart_field}' file field, or a raw body of type {', '.join(RAW_TYPES)}",
    )


# Unset fields stay out of the body: a classifier's answer has no ``anomaly`` key at all, and an
# anomaly model's has ``heatmap_png`` only when it was asked for.
@router.post(
    "/v1/inspect",
    response_model=InspectResult,
    response_model_exclude_unset=True,
    responses=_ERRORS,
    openapi_extra=_SINGLE_BODY,
)
async def inspect(
    request: Request,
    part_id: str | None = Query(None, max_length=255, description="The part's id on the line."),
    line_id: str | None = Query(None, max_length=255),
    camera_id: str | None = Query(None, max_length=255),
    heatmap: bool = _HEATMAP,
    idempotency_key: str | None = Header(None, max_length=200, description="Retry-safe request key."),
) -> dict[str, Any]:
    """Judge one image: ``ok``, ``defect`` or ``review``, with the model version that judged it.

    The image comes as a multipart file field ``image`` or as a raw ``image/jpeg``, ``image/png``
    or ``image/bmp`` body; ids come as query parameters (or multipart fields). A retry with the
    same ``Idempotency-Key`` returns the stored answer; the same key with another image is a 422.

    An anomaly model's answer adds ``anomaly``: ``score``; ``peak`` (the map's highest value and
    its pixel in the model input, as a fraction of the input's side and in the image as sent);
    ``region``, the box of the map's blob around the peak at or above the band's ``t_defect``,
    else ``t_ok`` (``box`` in pixels of the model input, ``x1``/``y1`` exclusive; ``box_fraction``
    of the input's side; ``image_box`` in pixels of the image as sent, the model's letterbox or
    crop undone), or null when the map reaches neither. With ``heatmap=true`` it also carries
    ``heatmap_png``: a base64 PNG at the model's input size, the map over the part (yellow at
    ``t_ok`` to red at ``t_defect``, the region outlined in cyan); null on a replayed answer,
    whose map is not stored. A classifier's answer has no ``anomaly``; ``heatmap=true`` to a
    classifier is a 422 ``heatmap_unavailable``.
    """
    state = serving_state(request)
    _check_heatmap(state, heatmap)
    media = _media_type(request)
    ids = {"part_id": part_id, "line_id": line_id, "camera_id": camera_id}
    if media == "multipart/form-data":
        form = await _form(request, max_files=1)
        data = (await _files(form, "image"))[0]
        ids = {k: _text_field(form, k) or v for k, v in ids.items()}
    elif media in RAW_TYPES:
        data = await request.body()
    else:
        raise _unsupported_media(media, "image")
    ids = {k: clean_id(k, v) for k, v in ids.items()}
    key = clean_id("Idempotency-Key", idempotency_key)
    part = PartInfo(ids["part_id"], ids["line_id"], ids["camera_id"])
    answers = await state.service.inspect(
        [ImageInput(data=data)], [part.part_id], part, key, keep_maps=heatmap
    )
    return await _body(state.service, answers[0], heatmap)


@router.post(
    "/v1/inspect/batch",
    response_model=BatchResult,
    response_model_exclude_unset=True,
    responses=_ERRORS,
    openapi_extra=_BATCH_BODY,
)
async def inspect_batch(
    request: Request,
    line_id: str | None = Query(None, max_length=255),
    camera_id: str | None = Query(None, max_length=255),
    heatmap: bool = _HEATMAP,
    idempotency_key: str | None = Header(None, max_length=200),
) -> dict[str, Any]:
    """Judge several images (multipart field ``images``, repeated; optional ``part_id`` per image).

    Image *i* of a request with ``Idempotency-Key: K`` is stored under ``K#i``. ``anomaly`` and
    ``heatmap=true`` work as in ``/v1/inspect``, per image.
    """
    state = serving_state(request)
    _check_heatmap(state, heatmap)
    media = _media_type(request)
    if media != "multipart/form-data":
        raise _unsupported_media(media, "images")
    form = await _form(request, max_files=MAX_BATCH_IMAGES)
    images = await _files(form, "images")
    part_ids = [clean_id("part_id", p if isinstance(p, str) else None) for p in form.getlist("part_id")]
    if part_ids and len(part_ids) != len(images):
        raise ApiError(
            422,
            "invalid_field",
            f"{len(part_ids)} part_id fields for {len(images)} images; send one per image or none",
        )
    line = clean_id("line_id", _text_field(form, "line_id") or line_id)
    camera = clean_id("camera_id", _text_field(form, "camera_id") or camera_id)
    key = clean_id("Idempotency-Key", idempotency_key)
    answers = await state.service.inspect(
        [ImageInput(data=d) for d in images],
        part_ids or [None] * len(images),
        PartInfo(None, line, camera),
        key,
        indexed_keys=True,
        keep_maps=heatmap,
    )
    return {"results": list(await asyncio.gather(*(_body(state.service, a, heatmap) for a in answers)))}
