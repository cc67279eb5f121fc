"""``GET /metrics``: Prometheus text exposition of this process's metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from kensa.serving.state import serving_state

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    """Latency histograms, batch sizes, queue depth, verdicts by model version, errors by code."""
    state = serving_state(request)
    state.metrics.queue_depth.set(state.service.batcher.depth)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
