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


class PixelBox(BaseModel):
    """A rectangle in pixels; ``x1`` and ``y1`` are exclusive (``a[y0:y1, x0:x1]``)."""

    x0: int
    y0: int
    x1: int
    y1: int


class FractionBox(BaseModel):
    """A rectangle as fractions 0-1 of the model input's side."""

    x0: float
    y0: float
    x1: float
    y1: float


class XY(BaseModel):
    x: float
    y: float


class AnomalyPeak(BaseModel):
    """The anomaly map's highest value and where it is."""

    value: float = Field(description="Map value at the peak, on the score's scale.")
    x: int = Field(description="Pixel column in the model input.")
    y: int = Field(description="Pixel row in the model input.")
    fraction: XY = Field(description="The peak pixel's centre as fractions of the input's side.")
    image: XY = Field(description="The peak pixel's centre in pixels of the image as sent.")


class AnomalyRegion(BaseModel):
    """The box of the map's blob around the peak at or above a band threshold."""

    threshold: str = Field(description="t_defect | t_ok: the band threshold the region was cut at.")
    level: float = Field(description="That threshold's value.")
    box: PixelBox = Field(description="Pixels of the model input.")
    box_fraction: FractionBox
    image_box: PixelBox = Field(description="Pixels of the image as sent (letterbox, crop undone).")
    area_fraction: float = Field(description="Share of the model input inside the blob.")


class AnomalyResult(BaseModel):
    """Where an anomaly model saw the defect (anomaly models only)."""

    score: float = Field(description="The image's anomaly score, p(defect_anomaly).")
    input_size: int = Field(description="Side of the model input, pixels.")
    peak: AnomalyPeak
    region: AnomalyRegion | None = Field(description="Null when the map reaches neither threshold.")
    heatmap_png: str | None = Field(
        None,
        description="With heatmap=true: base64 PNG of the map over the part, at the input size; "
        "null on a replayed answer (maps are not stored).",
    )


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
    anomaly: AnomalyResult | None = Field(
        None, description="Anomaly models only (the key is absent for a classifier)."
    )


class BatchResult(BaseModel):
    results: list[InspectResult]


class ModelInfo(BaseModel):
    """The model in service."""

    model_name: str
    model_version: str
    sha256: str
    architecture: str
    kind: str = Field("classifier", description="classifier | anomaly")
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
