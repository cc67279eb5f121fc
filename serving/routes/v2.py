"""The Open Inference Protocol v2 (KServe/Triton) REST API: health, metadata and infer."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from kensa import __version__
from kensa.serving.errors import ApiError
from kensa.serving.inference.engine import ServedModel
from kensa.serving.inference.predlog import Answer
from kensa.serving.inference.service import ImageInput, PartInfo
from kensa.serving.routes.schemas import (
    V2ErrorBody,
    V2InferResponse,
    V2Live,
    V2ModelMetadata,
    V2Ready,
    V2ServerMetadata,
)
from kensa.serving.routes.v2codec import INPUT_NAME, MAP_OUTPUT, model_outputs, parse_infer
from kensa.serving.state import clean_id, serving_state

router = APIRouter(tags=["v2"])
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": V2ErrorBody} for code in (400, 401, 403, 404, 413, 415, 422, 503, 504)
}
_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name", "shape", "datatype", "data"],
                                "properties": {
                                    "name": {"type": "string", "enum": [INPUT_NAME]},
                                    "shape": {"type": "array", "items": {"type": "integer"}},
                                    "datatype": {"type": "string", "enum": ["UINT8", "BYTES"]},
                                    "data": {"type": "array"},
                                },
                            },
                        },
                        "outputs": {
                            "type": "array",
                            "items": {"type": "object", "properties": {"name": {"type": "string"}}},
                        },
                    },
                }
            }
        },
    }
}


def _model(request: Request, name: str) -> ServedModel:
    model = serving_state(request).models.current
    if model is None:
        raise ApiError(503, "no_model", "no verified model is loaded yet", headers={"Retry-After": "5"})
    if name != model.name:
        raise ApiError(
            404,
            "unknown_model",
            f"model {name[:100]!r} is not served here; this server serves {model.name!r}",
        )
    return model


@router.get("/v2", response_model=V2ServerMetadata)
async def server_metadata() -> dict[str, Any]:
    """Server metadata."""
    return {"name": "kensa", "version": __version__, "extensions": ["binary_tensor_data"]}


@router.get("/v2/health/live", response_model=V2Live)
async def live() -> dict[str, Any]:
    """Liveness: the process answers."""
    return {"live": True}


@router.get("/v2/health/ready", response_model=V2Ready, responses={503: {"model": V2ErrorBody}})
async def ready(request: Request) -> Any:
    """Readiness: a verified model is loaded and the server is not shutting down."""
    state = serving_state(request)
    if state.ready:
        return {"ready": True}
    reason = "shutting down" if state.draining else "no verified model loaded"
    return JSONResponse({"ready": False, "error": f"not ready: {reason}"}, status_code=503)


@router.get("/v2/models/{name}", response_model=V2ModelMetadata, responses=_ERRORS)
async def model_metadata(request: Request, name: str) -> dict[str, Any]:
    """Model metadata: input and output tensors."""
    model = _model(request, name)
    size = model.spec.input_size
    return {
        "name": model.name,
        "versions": [model.version],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, size, size, 3]}],
        "outputs": [
            {"name": "probs", "datatype": "FP32", "shape": [-1, len(model.spec.classes)]},
            {"name": "features", "datatype": "FP32", "shape": [-1, model.spec.feature_dims or -1]},
            {"name": "verdict", "datatype": "BYTES", "shape": [-1]},
            {"name": "defect_type", "datatype": "BYTES", "shape": [-1]},
            *(
                [
                    {"name": "score", "datatype": "FP32", "shape": [-1]},
                    {"name": MAP_OUTPUT, "datatype": "FP32", "shape": [-1, size, size]},
                ]
                if model.spec.is_anomaly
                else []
            ),
        ],
    }


@router.get("/v2/models/{name}/ready", response_model=V2Ready, responses=_ERRORS)
async def model_ready(request: Request, name: str) -> dict[str, Any]:
    """Model readiness."""
    model = _model(request, name)
    if serving_state(request).draining:
        raise ApiError(503, "not_ready", "the server is shutting down")
    return {"name": model.name, "ready": True}


def _unavailable(name: str, answers: list[Answer]) -> ApiError:
    """An asked-for anomaly output that some answer cannot give: a replay (the log keeps the
    region, not the map), or, rarely, an image judged by a classifier swapped in meanwhile."""
    if any(a.replayed for a in answers):
        return ApiError(
            422,
            f"{name}_unavailable",
            f"output '{name}' is not stored with a verdict, and this answer was replayed for its "
            f"Idempotency-Key; ask without '{name}', or with a new key to judge the image again",
        )
    return ApiError(
        503,
        f"{name}_unavailable",
        f"output '{name}' is not available: the model in service changed while judging; retry",
        headers={"Retry-After": "1"},
    )


def _tensor(name: str, answers: list[Answer]) -> dict[str, Any]:
    """One output tensor, built only when asked for (a map is S × S numbers per image)."""
    n = len(answers)
    if name == "probs":
        classes = list(answers[0].probs)
        return {
            "shape": [n, len(classes)],
            "datatype": "FP32",
            "data": [a.probs[c] for a in answers for c in classes],
        }
    if name == "features":
        k = len(answers[0].features)
        return {"shape": [n, k], "datatype": "FP32", "data": [f for a in answers for f in a.features]}
    if name == "verdict":
        return {"shape": [n], "datatype": "BYTES", "data": [a.verdict for a in answers]}
    if name == "defect_type":
        return {"shape": [n], "datatype": "BYTES", "data": [a.defect_type or "" for a in answers]}
    if name == "score":
        scores = [a.anomaly.score for a in answers if a.anomaly is not None]
        if len(scores) != n:
            raise _unavailable(name, answers)
        return {"shape": [n], "datatype": "FP32", "data": [round(s, 6) for s in scores]}
    maps = [a.heat.amap for a in answers if a.heat is not None]
    if len(maps) != n:
        raise _unavailable(name, answers)
    size = int(maps[0].shape[0])
    return {
        "shape": [n, size, size],
        "datatype": "FP32",
        "data": [v for m in maps for v in np.round(m.astype(np.float64), 6).ravel().tolist()],
    }


def _outputs(answers: list[Answer], wanted: list[str]) -> list[dict[str, Any]]:
    return [{"name": name, **_tensor(name, answers)} for name in wanted]


@router.post(
    "/v2/models/{name}/infer",
    response_model=V2InferResponse,
    responses=_ERRORS,
    openapi_extra=_INFER_BODY,
)
async def infer(
    request: Request,
    name: str,
    idempotency_key: str | None = Header(None, max_length=200),
    inference_header_content_length: str | None = Header(None),
) -> dict[str, Any]:
    """Infer: UINT8 [B, S, S, 3] or BYTES [B] encoded images in; probs, features, verdict out.

    ``parameters`` may carry ``line_id``, ``camera_id`` and ``part_ids`` (a list, one per image).
    Every image is logged like a v1 verdict before the response is sent. An anomaly model also
    gives ``score`` [B] and, asked for by name in ``outputs``, ``anomaly_map`` [B, S, S] (left out
    of a request that names no outputs: S × S numbers per image).
    """
    state = serving_state(request)
    model = _model(request, name)
    parsed = parse_infer(
        await request.body(),
        inference_header_content_length,
        model.spec.input_size,
        model_outputs(model.spec.is_anomaly),
    )
    params = parsed.parameters
    part_ids = params.get("part_ids")
    if part_ids is None:
        part_ids = [None] * parsed.count
    elif not (
        isinstance(part_ids, list)
        and len(part_ids) == parsed.count
        and all(isinstance(p, str) for p in part_ids)
    ):
        raise ApiError(400, "bad_request", f"parameters.part_ids must be a list of {parsed.count} strings")
    ids = {k: params.get(k) for k in ("line_id", "camera_id")}
    if any(v is not None and not isinstance(v, str) for v in ids.values()):
        raise ApiError(400, "bad_request", "parameters.line_id and camera_id must be strings")
    part = PartInfo(None, clean_id("line_id", ids["line_id"]), clean_id("camera_id", ids["camera_id"]))
    if parsed.tensor is not None:
        images = [ImageInput(pixels=img) for img in parsed.tensor]
    else:
        images = [ImageInput(data=d) for d in parsed.encoded or []]
    answers = await state.service.inspect(
        images,
        [clean_id("part_id", p) for p in part_ids],
        part,
        clean_id("Idempotency-Key", idempotency_key),
        indexed_keys=True,
        keep_maps=MAP_OUTPUT in parsed.outputs,
    )
    # A batch straddling a swap is judged by more than one version; name each image's version.
    versions = [a.model_version for a in answers]
    return {
        "model_name": answers[0].model_name,
        "model_version": versions[-1],
        "id": parsed.id,
        "parameters": {
            "request_ids": [a.request_id for a in answers],
            "model_versions": versions,
            "replayed": [a.replayed for a in answers],
        },
        "outputs": _outputs(answers, parsed.outputs),
    }
