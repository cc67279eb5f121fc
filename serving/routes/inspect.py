"""``POST /v1/inspect`` and ``/v1/inspect/batch``: images in, verdicts (with model version) out."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Header, Query, Request
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException

from kensa.serving.errors import ACCEPTED_FORMATS, ApiError
from kensa.serving.inference.predlog import describe
from kensa.serving.inference.service import ImageInput, PartInfo
from kensa.serving.routes.schemas import BatchResult, ErrorBody, InspectResult
from kensa.serving.state import clean_id, serving_state

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


def _unsupported_media(media: str, multipart_field: str) -> ApiError:
    return ApiError(
        415,
        "unsupported_media_type",
        f"Content-Type {media or 'missing'!r} is not accepted; send multipart/form-data with a "
        f"'{multipart_field}' file field, or a raw body of type {', '.join(RAW_TYPES)}",
    )


@router.post("/v1/inspect", response_model=InspectResult, responses=_ERRORS, openapi_extra=_SINGLE_BODY)
async def inspect(
    request: Request,
    part_id: str | None = Query(None, max_length=255, description="The part's id on the line."),
    line_id: str | None = Query(None, max_length=255),
    camera_id: str | None = Query(None, max_length=255),
    idempotency_key: str | None = Header(None, max_length=200, description="Retry-safe request key."),
) -> dict[str, Any]:
    """Judge one image: ``ok``, ``defect`` or ``review``, with the model version that judged it.

    The image comes as a multipart file field ``image`` or as a raw ``image/jpeg``, ``image/png``
    or ``image/bmp`` body; ids come as query parameters (or multipart fields). A retry with the
    same ``Idempotency-Key`` returns the stored answer; the same key with another image is a 422.
    """
    state = serving_state(request)
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
    answers = await state.service.inspect([ImageInput(data=data)], [part.part_id], part, key)
    return describe(answers[0])


@router.post("/v1/inspect/batch", response_model=BatchResult, responses=_ERRORS, openapi_extra=_BATCH_BODY)
async def inspect_batch(
    request: Request,
    line_id: str | None = Query(None, max_length=255),
    camera_id: str | None = Query(None, max_length=255),
    idempotency_key: str | None = Header(None, max_length=200),
) -> dict[str, Any]:
    """Judge several images (multipart field ``images``, repeated; optional ``part_id`` per image).

    Image *i* of a request with ``Idempotency-Key: K`` is stored under ``K#i``.
    """
    state = serving_state(request)
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
    )
    return {"results": [describe(a) for a in answers]}
