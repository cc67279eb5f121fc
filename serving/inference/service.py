"""The inspection pipeline behind every route: admit, dedupe by key, decode, batch, log, answer."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from kensa.logs import context_fields, new_request_id, request_id
from kensa.models.data.imageprep import Preprocess
from kensa.models.evaluation.qc import verdicts
from kensa.serving.errors import ApiError
from kensa.serving.inference.anomaly import HeatSource, render_heatmap
from kensa.serving.inference.batcher import QUEUED, Batcher, BatchResult, Job
from kensa.serving.inference.decode import (
    EXTENSIONS,
    DecodedImage,
    decode_image,
    encode_png,
    sha256_hex,
    tensor_image,
)
from kensa.serving.inference.predlog import Answer, PendingRow, PredictionLog, key_conflict
from kensa.serving.inference.swap import ModelManager
from kensa.serving.metrics import Metrics
from kensa.settings import Settings

log = logging.getLogger("kensa.serving.service")

DEFAULT_LINE = "unknown"


@dataclass(frozen=True)
class PartInfo:
    """Who the image is of: optional ids sent by the caller."""

    part_id: str | None = None
    line_id: str | None = None
    camera_id: str | None = None


@dataclass(frozen=True)
class ImageInput:
    """One image of a request: encoded bytes (v1, v2 BYTES) or a raw uint8 tensor (v2 UINT8)."""

    data: bytes | None = None
    pixels: np.ndarray | None = None


@dataclass
class _Context:
    request_id: str
    key: str | None
    part: PartInfo
    source: ImageInput
    log_fields: Mapping[str, Any]  # the request's logging context (its id), for the verdict line
    keep_map: bool = False  # the caller wants the anomaly map (a heatmap, a v2 output)


class InspectionService:
    """Owns the decode pool, the batcher and the prediction log for one app."""

    def __init__(
        self, settings: Settings, models: ModelManager, predlog: PredictionLog, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.models = models
        self.predlog = predlog
        self.metrics = metrics
        self._decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="kensa-decode")
        # Reads (idempotency lookups) and writes (a batch's rows) go to separate threads, so a
        # lookup never waits behind a commit; writes are as concurrent as the store allows.
        self._db_pool = ThreadPoolExecutor(2, thread_name_prefix="kensa-db")
        self._write_pool = ThreadPoolExecutor(predlog.writers, thread_name_prefix="kensa-write")
        self._pending: dict[str, asyncio.Future[Answer]] = {}
        self._in_flight = 0
        self.batcher = Batcher(
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            queue_size=settings.queue_size,
            current_model=lambda: models.current,
            finish=self._finish,
            on_batch=self._observe_batch,
        )

    def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.drain(timeout=self.settings.request_timeout_s)
        await self.batcher.close()
        self._decode_pool.shutdown(wait=True)
        self._db_pool.shutdown(wait=True)
        self._write_pool.shutdown(wait=True)

    def _observe_batch(self, size: int, waited_s: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.queue_wait.observe(waited_s)
        self.metrics.queue_depth.set(self.batcher.depth)

    async def inspect(
        self,
        images: list[ImageInput],
        part_ids: list[str | None],
        part: PartInfo,
        key: str | None,
        *,
        indexed_keys: bool = False,
        keep_maps: bool = False,
    ) -> list[Answer]:
        """Judge ``images``; each answer is logged (committed) before this returns.

        ``key`` is the Idempotency-Key; with ``indexed_keys`` (batch routes) image i uses ``key#i``.
        A verdict's ``request_id`` is the HTTP request's (``X-Request-ID``), or ``<id>-<i>`` for
        image i of several; so one HTTP request makes one call here. With ``keep_maps``, an
        anomaly model's answers carry their map (``Answer.heat``); other answers never hold one.
        """
        if self.models.current is None:
            raise _no_model()
        # Admission: at most queue_size images in decode or queue at once; beyond that, 503 now.
        if self._in_flight + len(images) > self.settings.queue_size:
            raise ApiError(
                503,
                "overloaded",
                "the service is at capacity; retry shortly",
                headers={"Retry-After": "1"},
            )
        self._in_flight += len(images)
        self.metrics.in_flight.set(self._in_flight)
        received = time.perf_counter()
        rid = request_id() or new_request_id()
        ids = [rid] if len(images) == 1 else [f"{rid}-{i}" for i in range(len(images))]
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                return list(
                    await asyncio.gather(
                        *(
                            self._one(
                                img,
                                PartInfo(pid or None, part.line_id, part.camera_id),
                                f"{key}#{i}" if key is not None and indexed_keys else key,
                                ids[i],
                                received,
                                keep_maps,
                            )
                            for i, (img, pid) in enumerate(zip(images, part_ids, strict=True))
                        )
                    )
                )
        except TimeoutError:
            raise ApiError(
                504,
                "deadline_exceeded",
                f"no verdict within {self.settings.request_timeout_s:g} s; retry "
                "with the same Idempotency-Key to get the verdict if it was made",
            ) from None
        finally:
            self._in_flight -= len(images)
            self.metrics.in_flight.set(self._in_flight)

    async def _one(
        self,
        image: ImageInput,
        part: PartInfo,
        key: str | None,
        rid: str,
        received: float,
        keep_map: bool,
    ) -> Answer:
        loop = asyncio.get_running_loop()
        if key is None:
            return await self._judge(image, part, None, rid, received, keep_map)
        sha = await loop.run_in_executor(self._decode_pool, _digest, image)
        waiting = self._pending.get(key)
        if waiting is not None:  # the same key is being judged right now: share its answer
            first = await asyncio.shield(waiting)
            return _replay(first, sha, key)
        future: asyncio.Future[Answer] = loop.create_future()
        self._pending[key] = future
        try:
            stored = await loop.run_in_executor(self._db_pool, self.predlog.find, key)
            answer = (
                _replay(stored, sha, key)
                if stored is not None
                else await self._judge(image, part, key, rid, received, keep_map)
            )
            future.set_result(answer)
            return answer
        except BaseException as exc:
            # Whoever waits on this key shares the outcome; a cancelled first attempt (its
            # deadline passed) is a deadline for them too.
            shared = (
                exc
                if isinstance(exc, Exception)
                else ApiError(
                    504,
                    "deadline_exceeded",
                    "the first request with this Idempotency-Key gave up; retry",
                )
            )
            future.set_exception(shared)
            future.exception()  # mark retrieved: nobody may be waiting
            raise
        finally:
            del self._pending[key]

    async def _judge(
        self,
        image: ImageInput,
        part: PartInfo,
        key: str | None,
        rid: str,
        received: float,
        keep_map: bool,
    ) -> Answer:
        loop = asyncio.get_running_loop()
        current = self.models.current
        if current is None:
            raise _no_model()
        # The model's own recipe (its ONNX metadata): the pixels it was trained on.
        decoded = await loop.run_in_executor(self._decode_pool, self._decode, image, current.spec.preprocess)
        future: asyncio.Future[Answer] = loop.create_future()
        context = _Context(rid, key, part, image, context_fields(), keep_map)
        job = Job(decoded, _resizer(image, self.settings.max_pixels), context, received, future)
        self.batcher.submit(job)
        self.metrics.queue_depth.set(self.batcher.depth)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if job.state == QUEUED:  # deadline passed before inference: drop it, log nothing
                job.state = "cancelled"
            raise

    async def heatmap_png(self, answer: Answer) -> str | None:
        """The answer's heatmap as a base64 PNG (drawn in the decode pool), or None without a map:
        a classifier's answer, or a replayed one (the log keeps the region, not the map)."""
        if answer.heat is None:
            return None
        loop = asyncio.get_running_loop()
        png = await loop.run_in_executor(self._decode_pool, render_heatmap, answer.heat)
        return base64.b64encode(png).decode("ascii")

    def _decode(self, image: ImageInput, recipe: Preprocess) -> DecodedImage:
        if image.pixels is not None:
            return tensor_image(image.pixels)
        return decode_image(image.data or b"", recipe, self.settings.max_pixels)

    async def _finish(self, result: BatchResult) -> None:
        """Build the rows of a batch, commit them in one transaction, then answer its requests."""
        model = result.model
        spec = model.spec
        verdict, dtype = verdicts(result.probs, spec.classes, spec.t_ok, spec.t_defect)
        rows: list[PendingRow] = []
        for i, job in enumerate(result.jobs):
            ctx: _Context = job.context
            answer = Answer(
                request_id=ctx.request_id,
                verdict=str(verdict[i]),
                defect_type=None if dtype[i] is None else str(dtype[i]),
                probs={c: round(float(p), 6) for c, p in zip(spec.classes, result.probs[i], strict=True)},
                features=[round(float(f), 6) for f in result.features[i]],
                model_name=model.name,
                model_version=model.version,
                latency_ms=round((result.inferred - job.received) * 1000.0, 3),
                part_id=ctx.part.part_id or ctx.request_id,
                image_sha256=job.image.sha256,
                anomaly=result.findings[i] if result.findings is not None else None,
                heat=_heat_source(result, i) if ctx.keep_map else None,
            )
            rows.append(
                PendingRow(
                    answer=answer,
                    idempotency_key=ctx.key,
                    line_id=ctx.part.line_id or DEFAULT_LINE,
                    camera_id=ctx.part.camera_id,
                    image_stats=job.image.stats,
                    image_ext=EXTENSIONS.get(job.image.format, "png"),
                    image_bytes=_stored_bytes(ctx.source, job.image),
                )
            )
        loop = asyncio.get_running_loop()
        try:
            outcomes = await loop.run_in_executor(self._write_pool, self.predlog.write, rows)
        except Exception as exc:  # the store is down: no row, so no verdict may be given
            log.error(
                "prediction_log_write_failed",
                extra={
                    "prediction_ids": [r.answer.request_id for r in rows],
                    "model_name": model.name,
                    "model_version": model.version,
                    "error": type(exc).__name__,
                },
            )
            err = ApiError(
                503,
                "store_unavailable",
                "the prediction log cannot be written; retry",
                headers={"Retry-After": "2"},
            )
            outcomes = [err] * len(rows)
        for job, outcome in zip(result.jobs, outcomes, strict=True):
            if isinstance(outcome, Answer):
                self.metrics.verdicts.labels(outcome.model_name, outcome.model_version, outcome.verdict).inc()
                _log_verdict(outcome, job.context)
            if job.future.done():
                continue
            if isinstance(outcome, ApiError):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)


def _log_verdict(answer: Answer, ctx: _Context) -> None:
    # Batches are finished on the batcher's task, outside the request's logging context: the
    # request's fields (its id) travel with the job. ``prediction_id`` is the verdict's
    # ``request_id`` in the response and the prediction log: the request id, or ``<id>-<i>``
    # for image i of several.
    log.info(
        "verdict",
        extra={
            **ctx.log_fields,
            "prediction_id": answer.request_id,
            "model_name": answer.model_name,
            "model_version": answer.model_version,
            "verdict": answer.verdict,
            "defect_type": answer.defect_type,
            "replayed": answer.replayed,
            "latency_ms": answer.latency_ms,
            "part_id": answer.part_id,
            "line_id": ctx.part.line_id or DEFAULT_LINE,
        },
    )


def _heat_source(result: BatchResult, i: int) -> HeatSource | None:
    if result.maps is None or result.images is None or result.findings is None:
        return None
    region = result.findings[i].region
    spec = result.model.spec
    return HeatSource(
        result.images[i], result.maps[i], spec.t_ok, spec.t_defect, region.box if region else None
    )


def _digest(image: ImageInput) -> str:
    if image.pixels is not None:
        return sha256_hex(np.ascontiguousarray(image.pixels, dtype=np.uint8).tobytes())
    return sha256_hex(image.data or b"")


def _replay(answer: Answer, sha: str, key: str) -> Answer:
    if answer.image_sha256 != sha:
        raise key_conflict(key)
    return dataclasses.replace(answer, replayed=True)


def _no_model() -> ApiError:
    return ApiError(
        503,
        "no_model",
        "no verified model is loaded yet; retry shortly",
        headers={"Retry-After": "5"},
    )


def _resizer(image: ImageInput, max_pixels: int) -> Callable[[Preprocess], np.ndarray]:
    def resize(recipe: Preprocess) -> np.ndarray:
        if image.pixels is not None:
            from PIL import Image

            # A raw tensor is already a model input: only its size changes, never its framing.
            pil = Image.fromarray(np.ascontiguousarray(image.pixels, dtype=np.uint8), "RGB")
            size = recipe.size
            return np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
        return decode_image(image.data or b"", recipe, max_pixels).pixels

    return resize


def _stored_bytes(source: ImageInput, decoded: DecodedImage) -> Callable[[], bytes]:
    if source.data is not None:
        data = source.data
        return lambda: data
    return lambda: encode_png(decoded.pixels)
