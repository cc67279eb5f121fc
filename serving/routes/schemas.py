"""Response bodies of the kensa routes (pydantic v2), so the OpenAPI spec says what comes back."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    """Every kensa error: a stable code and a message naming what was wrong and what is accepted."""

    error: str = Field(examples=["unsupported_image_format"])
    detail: str = Field(examples=["the image looks like a PDF document; accepted formats: JPEG, PNG or BMP"])


class V2ErrorBody(BaseModel):
    """The Open Inference Protocol's error body."""

    error: str


class InspectResult(BaseModel):
    """The verdict on one part, naming the model version that judged it."""

    request_id: str
    part_id: str
    verdict: str = Field(description="ok | defect | review", examples=["ok"])
    defect_type: str | None = Field(description="Most probable defect class (defect and review).")
    probs: dict[str, float] = Field(description="Class name -> probability.")
    model_name: str
    model_version: str
    latency_ms: float = Field(description="Arrival to verdict, before the log commit (ms).")
    replayed: bool = Field(
        description="True when this is the stored answer to an earlier request with the same Idempotency-Key."
    )


class BatchResult(BaseModel):
    results: list[InspectResult]


class ModelInfo(BaseModel):
    """The model in service."""

    model_name: str
    model_version: str
    sha256: str
    architecture: str
    classes: list[str]
    input_size: int
    thresholds: dict[str, float]
    provider: str
    precision: str
    runners: int = Field(description="Batches in inference at once (KENSA_INFERENCE_RUNNERS).")
    warmup_ms_per_image: float = Field(description="Warm-up inference time per image, ms.")
    loaded_at: str


class ReloadResult(BaseModel):
    status: str = Field(description="unchanged | swapped | none")
    model: ModelInfo | None


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Ready(BaseModel):
    name: str | None = None
    ready: bool


class V2Live(BaseModel):
    live: bool


class V2Output(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float] | list[str] | list[str | None]


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, list[str] | list[bool]] = Field(default_factory=dict)
    outputs: list[V2Output]
