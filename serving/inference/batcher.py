"""Micro-batching: a bounded queue of decoded images, batched for one inference thread.

A batch is dispatched when it is full (``max_batch_size``) or when its oldest image has waited
``max_wait_ms``. While inference is busy, new images pile up and form the next batch, so batches
grow with load by themselves. Inference runs in worker threads so the event loop never blocks;
writing the batch's log rows runs as a separate task, so the next batch's inference overlaps the
previous batch's commit.

Most models run one batch at a time (onnxruntime spreads it over its threads and the other cores
decode and answer). A heavy model (``ServedModel.runners`` = 2, chosen from its warm-up timing)
runs two: inference, not decoding, is then what bounds throughput, and two independent runs keep
every core busy where one run's threads wait on each other whenever a decode takes their core.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kensa.models.data.imageprep import Preprocess
from kensa.serving.errors import ApiError
from kensa.serving.inference.anomaly import Finding, locate
from kensa.serving.inference.decode import DecodedImage
from kensa.serving.inference.engine import Inference, ServedModel

log = logging.getLogger("kensa.serving.batcher")

QUEUED, TAKEN, CANCELLED = "queued", "taken", "cancelled"
# Most batches in inference at once, whatever a model asks for (threads kept by the pool).
MAX_RUNNERS = 8


@dataclass(eq=False)
class Job:
    """One image waiting for a verdict. ``state`` changes only on the event loop."""

    image: DecodedImage
    # Re-makes the pixels with another recipe, for a job queued across a swap to a model with a
    # different input size or preprocessing (rare; decoding again from the original bytes
    # keeps quality).
    resize: Callable[[Preprocess], np.ndarray]
    context: Any
    received: float  # perf_counter() when the request arrived
    future: asyncio.Future[Any]
    enqueued: float = field(default_factory=time.perf_counter)
    state: str = QUEUED


@dataclass(frozen=True)
class BatchResult:
    """What one batch produced, handed to the finishing stage (logging, then answering)."""

    model: ServedModel
    jobs: list[Job]
    probs: np.ndarray  # (B, C)
    features: np.ndarray  # (B, K)
    inferred: float  # perf_counter() when inference finished
    # Anomaly models only: one finding per image (score, peak, region), the batch's maps
    # (B, S, S) and the inputs (B, S, S, 3) the model saw. The arrays are the batch's own, kept
    # (not copied) until its answers are built; a job that asked for its map gets views of them.
    findings: list[Finding] | None = None
    maps: np.ndarray | None = None
    images: np.ndarray | None = None


FinishFn = Callable[[BatchResult], Coroutine[Any, Any, None]]


class Batcher:
    """Bounded queue → batches → inference thread → ``finish`` task per batch."""

    def __init__(
        self,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        queue_size: int,
        current_model: Callable[[], ServedModel | None],
        finish: FinishFn,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self._max_batch = max_batch_size
        self._max_wait = max_wait_ms / 1000.0
        self._queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=queue_size)
        self._current_model = current_model
        self._finish = finish
        self._on_batch = on_batch
        # Threads start on demand: a light model only ever uses one.
        self._infer_pool = ThreadPoolExecutor(MAX_RUNNERS, thread_name_prefix="kensa-infer")
        self._running = 0  # batches in inference now
        self._slot_freed = asyncio.Event()
        self._inferring: set[asyncio.Task[None]] = set()
        self._finishing: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="kensa-batcher")

    def submit(self, job: Job) -> None:
        """Queue a job, or answer 503 at once when the queue is full (no waiting in line)."""
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise ApiError(
                503,
                "overloaded",
                "the inference queue is full; retry shortly",
                headers={"Retry-After": "1"},
            ) from None

    async def _gather(self) -> list[Job]:
        first = await self._queue.get()
        batch = [first]
        deadline = first.enqueued + self._max_wait
        while len(batch) < self._max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    def _allowed(self) -> int:
        model = self._current_model()
        return min(MAX_RUNNERS, max(1, model.runners)) if model is not None else 1

    async def _loop(self) -> None:
        while True:
            # Gather the next batch only once a runner is free: until then images keep arriving
            # and the batch grows, instead of waiting formed while older ones are judged.
            while self._running >= self._allowed():
                self._slot_freed.clear()
                await self._slot_freed.wait()
            batch = [j for j in await self._gather() if j.state == QUEUED]
            if not batch:
                continue
            for job in batch:
                job.state = TAKEN
            model = self._current_model()
            if model is None:  # no verified model (registry empty or every version refused)
                err = ApiError(
                    503,
                    "no_model",
                    "no verified model is loaded yet; retry shortly",
                    headers={"Retry-After": "5"},
                )
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(err)
                continue
            self._running += 1
            task = asyncio.create_task(self._run(model, batch))
            self._inferring.add(task)
            task.add_done_callback(self._inferring.discard)

    async def _run(self, model: ServedModel, batch: list[Job]) -> None:
        """Infer one batch on ``model`` (the model it was formed for), then start its finishing."""
        loop = asyncio.get_running_loop()
        try:
            out, images, findings = await loop.run_in_executor(self._infer_pool, _infer, model, batch)
        except Exception as exc:  # a verified model failing at run time: ours, not the caller's
            log.exception(
                "inference_failed",
                extra={
                    "model_name": model.name,
                    "model_version": model.version,
                    "prediction_ids": [getattr(j.context, "request_id", None) for j in batch],
                },
            )
            err = ApiError(
                503,
                "inference_failed",
                f"inference failed ({type(exc).__name__}); retry",
                headers={"Retry-After": "1"},
            )
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        finally:
            self._running -= 1
            self._slot_freed.set()
        inferred = time.perf_counter()
        if self._on_batch is not None:
            self._on_batch(len(batch), inferred - batch[0].enqueued)
        result = BatchResult(
            model,
            batch,
            out.probs,
            out.features,
            inferred,
            findings,
            out.maps,
            images if out.maps is not None else None,
        )
        task = asyncio.create_task(self._finish(result))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def drain(self, timeout: float) -> None:
        """Wait until queued jobs are answered and their rows written (shutdown)."""
        end = time.perf_counter() + timeout
        while (not self._queue.empty() or self._inferring or self._finishing) and time.perf_counter() < end:
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._infer_pool.shutdown(wait=True)


def _infer(model: ServedModel, batch: list[Job]) -> tuple[Inference, np.ndarray, list[Finding] | None]:
    """Inference, and for an anomaly model each image's region, here in the inference thread:
    cutting regions from the maps is array work the event loop must not do."""
    spec = model.spec
    recipe = spec.preprocess
    images = np.stack([job.image.pixels if _fits(job.image, recipe) else job.resize(recipe) for job in batch])
    out = model.infer(images)
    if out.maps is None or out.scores is None:
        return out, images, None
    findings = [
        # An encoded image was made by the model's recipe (here or at decode); a raw tensor is
        # the input itself or its plain resize (recipe None).
        locate(
            out.maps[i],
            float(out.scores[i]),
            spec.t_ok,
            spec.t_defect,
            recipe if job.image.recipe is not None else None,
            job.image.width,
            job.image.height,
        )
        for i, job in enumerate(batch)
    ]
    return out, images, findings


def _fits(image: DecodedImage, recipe: Preprocess) -> bool:
    """Whether ``image``'s pixels are what ``recipe`` makes (a raw tensor: only its size counts)."""
    if image.pixels.shape[0] != recipe.size:
        return False
    return image.recipe is None or image.recipe == recipe
