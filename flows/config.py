"""The project config (`kensa.toml`): classes, KPI targets, pilot, sweep, compute targets, approval."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kensa.governance.approvals import Approval
from kensa.models.data.imageprep import MAX_SIZE, Box, Fit, Preprocess, check_image_size
from kensa.settings import DEFAULT_CLASSES


class ConfigError(ValueError):
    """A project config that does not validate; the message names each bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KPI(_Strict):
    """What the line needs from a model before anyone spends on scale or ships it."""

    max_escape_rate: float = Field(0.05, gt=0, lt=1, description="α: escapes / defective parts.")
    confidence: float = Field(0.9, gt=0, lt=1, description="1 − δ of the band's guarantee.")
    max_false_reject_rate: float = Field(0.05, gt=0, lt=1)
    min_automation_rate: float = Field(0.5, ge=0, le=1)
    # On the corrupted test set (mean over the suite at severities ≤ corruption_severity).
    max_corrupted_escape_rate: float = Field(0.10, gt=0, le=1)
    corruption_severity: int = Field(3, ge=1, le=5)
    max_relative_ce: float = Field(
        1.5, gt=0, description="ImageNet-C relative corruption error vs the pilot model."
    )


class ComputeTarget(_Strict):
    """A named place to run a stage, with the price of an hour there."""

    work_pool: str
    kind: Literal["onprem", "cloud", "local"] = "onprem"
    device: Literal["cpu", "cuda"] = "cpu"
    gpus: int = Field(0, ge=0)
    cost_per_hour: float = Field(ge=0)
    capacity: int = Field(1, ge=1, description="Trials that may run at once.")
    # Relative speed vs this machine's CPU, for estimates before a run (measured ones replace it).
    speedup: float = Field(1.0, gt=0)


class Stage(_Strict):
    target: str = "onprem-gpu"
    budget: float = Field(ge=0, description="Most this stage may cost, in the ledger currency.")


class ImageRecipe(_Strict):
    """How a stage's photos become model inputs (kensa.models.data.imageprep); serving decodes alike."""

    image_size: int | None = Field(
        None,
        description="Model input side in px, 32-384 (128-384 for real parts); none: the dataset's own.",
    )
    fit: Fit = Field("letterbox", description="letterbox (aspect kept), roi (crop, then letterbox), squash.")
    roi: Box | None = Field(None, description="x0, y0, x1, y1 as fractions of the image, with fit = roi.")

    @model_validator(mode="after")
    def _recipe_valid(self) -> ImageRecipe:
        if self.image_size is not None:
            check_image_size(self.image_size)
        Preprocess(self.image_size or MAX_SIZE, self.fit, self.roi)  # fit and roi agree, roi inside
        return self

    def recipe_fields(self) -> dict[str, object]:
        """The TrainConfig fields of this recipe: ``TrainConfig(..., **stage.recipe_fields())``."""
        return {"image_size": self.image_size, "fit": self.fit, "roi": self.roi}


# How much of a pretrained model trains (kensa.models.nets.zoo.FINETUNES; spelled out here so
# reading the config does not import torch): head (frozen backbone on cached maps), last, all.
FinetuneName = Literal["head", "last", "all"]


class Pilot(Stage, ImageRecipe):
    model: str = "efficientnet_lite0"
    fraction: float = Field(0.5, gt=0, le=1)
    epochs: int = Field(15, ge=1)
    finetune: FinetuneName | None = Field(
        None,
        description="For a pretrained model: head, last or all; none: the model's default (head "
        "pretrained, all from scratch, the only choice there).",
    )
    max_minutes: float = Field(10, gt=0)
    budget: float = 5.0


class Sweep(Stage, ImageRecipe):
    models: list[str] = Field(default_factory=lambda: ["mobilenet_v2", "efficientnet_lite0"])
    fractions: list[float] = Field(default_factory=lambda: [0.5, 1.0])
    # Rungs each pretrained model is trained at; a from-scratch model always trains "all".
    finetunes: list[FinetuneName] = Field(default_factory=lambda: list[FinetuneName](["head"]))
    epochs: int = Field(15, ge=1)
    burst_target: str | None = "cloud-gpu"
    budget: float = 50.0
    max_robustness_images: int = Field(192, ge=16)

    @model_validator(mode="after")
    def _fractions_valid(self) -> Sweep:
        if not self.models or not self.fractions or not self.finetunes:
            msg = "sweep.models, sweep.fractions and sweep.finetunes must each name at least one value"
            raise ValueError(msg)
        if any(not 0 < f <= 1 for f in self.fractions):
            msg = f"sweep.fractions must be in (0, 1]; got {self.fractions}"
            raise ValueError(msg)
        return self

    def finetunes_for(self, pretrained: bool) -> list[FinetuneName]:
        """The rungs a model is swept at: ``finetunes`` if it is pretrained, else just ``all``."""
        return list(dict.fromkeys(self.finetunes)) if pretrained else ["all"]


class ServingPlan(_Strict):
    """What serving a model will cost: the TCO's second half."""

    parts_per_day: int = Field(50_000, ge=1)
    planned_life_days: int = Field(365, ge=1)
    cost_per_hour: float = Field(0.40, ge=0, description="Serving host price per hour.")
    batch_size: int = Field(8, ge=1)


class ProjectConfig(_Strict):
    name: str = "kensa-qc"
    classes: list[str] = Field(default_factory=lambda: list(DEFAULT_CLASSES))
    currency: str = Field("USD", min_length=3, max_length=3)
    kpi: KPI = KPI()
    pilot: Pilot = Pilot()
    sweep: Sweep = Sweep()
    serving: ServingPlan = ServingPlan()
    approval: Approval = Approval()
    targets: dict[str, ComputeTarget] = Field(
        default_factory=lambda: {
            "local": ComputeTarget(work_pool="local", kind="local", cost_per_hour=0.0, capacity=1),
            "onprem-gpu": ComputeTarget(
                work_pool="onprem-gpu", kind="onprem", cost_per_hour=0.60, capacity=1
            ),
            "cloud-gpu": ComputeTarget(work_pool="cloud-gpu", kind="cloud", cost_per_hour=2.50, capacity=4),
        }
    )

    @model_validator(mode="after")
    def _references_exist(self) -> ProjectConfig:
        if not self.classes or self.classes[0] != "ok" or len(self.classes) < 2:
            msg = f"classes must start with 'ok' and name at least one defect; got {self.classes}"
            raise ValueError(msg)
        for where, name in (
            ("pilot.target", self.pilot.target),
            ("sweep.target", self.sweep.target),
            ("sweep.burst_target", self.sweep.burst_target),
        ):
            if name is not None and name not in self.targets:
                msg = f"{where} = {name!r} is not a compute target; known: {sorted(self.targets)}"
                raise ValueError(msg)
        return self

    @property
    def alpha(self) -> float:
        return self.kpi.max_escape_rate

    @property
    def delta(self) -> float:
        return 1.0 - self.kpi.confidence


def load_project_config(path: Path | None) -> ProjectConfig:
    """Read and validate ``kensa.toml``; ``None`` gives the defaults. Errors name each field."""
    if path is None:
        return ProjectConfig()
    if not path.is_file():
        msg = f"project config {path} does not exist"
        raise ConfigError(msg)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        msg = f"{path} is not valid TOML: {exc}"
        raise ConfigError(msg) from None
    return parse_project_config(raw, str(path))


def parse_project_config(raw: dict[str, object], where: str = "config") -> ProjectConfig:
    try:
        return ProjectConfig.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {field}: {err['msg']}")
        msg = f"{where} is invalid:\n" + "\n".join(lines)
        raise ConfigError(msg) from None
