"""Prometheus metrics of one app instance (own registry, so tests can run several apps at once)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets in seconds: a line budget is tens of milliseconds; the tail shows overload.
_LATENCY_BUCKETS = (
    0.002,
    0.005,
    0.01,
    0.02,
    0.035,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Every metric the service exports, registered on a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_latency = Histogram(
            "kensa_request_latency_seconds",
            "Time from request arrival to response, by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "kensa_batch_wait_seconds",
            "Time the oldest image of a batch waited before inference.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "kensa_batch_size",
            "Images per inference batch.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("kensa_queue_depth", "Images waiting for inference.", registry=r)
        self.in_flight = Gauge("kensa_requests_in_flight", "Inference requests being handled.", registry=r)
        self.verdicts = Counter(
            "kensa_verdicts_total",
            "Verdicts given, by model version and verdict.",
            ["model_name", "model_version", "verdict"],
            registry=r,
        )
        self.errors = Counter(
            "kensa_errors_total",
            "Error responses, by HTTP status and error code.",
            ["status", "code"],
            registry=r,
        )
        self.model_info = Gauge(
            "kensa_model_info",
            "The model serving now (value 1), with its provider.",
            ["model_name", "model_version", "provider", "precision"],
            registry=r,
        )
        self.swaps = Counter("kensa_model_swaps_total", "Models swapped in.", registry=r)
        self.refusals = Counter(
            "kensa_model_refusals_total",
            "Models refused by verification, by failed step.",
            ["step"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
