"""Choosing a configuration: the lowest total cost of ownership that meets the KPI on corrupted data."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Trial:
    """One sweep trial as the decision sees it."""

    key: str  # "model@fraction"
    model: str
    fraction: float
    parameters: int
    train_images: int
    clean_error: float
    corrupted_error: float
    escape_rate: float
    corrupted_escape_rate: float
    training_cost: float
    serving_cost_per_million: float
    tco: float
    meets_kpi: bool
    gaps: tuple[str, ...] = ()
    target: str = ""
    run_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tco(training_cost: float, serving_cost_per_million: float, planned_millions: float) -> float:
    """Training cost plus serving cost over the model's planned life (in millions of parts)."""
    return training_cost + serving_cost_per_million * planned_millions


def choose(trials: list[Trial]) -> Trial | None:
    """The cheapest trial (by TCO) among those meeting the KPI; ties go to the smaller model.

    None when no trial meets the KPI: the sweep then registers nothing.
    """
    eligible = [t for t in trials if t.meets_kpi]
    if not eligible:
        return None
    return min(eligible, key=lambda t: (t.tco, t.parameters, t.train_images))
