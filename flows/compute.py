"""Compute targets, cost estimates before a stage starts, and hybrid on-prem/cloud placement."""

from __future__ import annotations

from dataclasses import dataclass

from kensa.flows.config import ComputeTarget, ProjectConfig


class BudgetExceededError(RuntimeError):
    """A stage whose estimate is over its budget: it does not start."""


@dataclass(frozen=True)
class Estimate:
    """What a stage is expected to cost before it runs."""

    stage: str
    target: str
    images: int  # training images processed (examples × epochs)
    images_per_second: float  # measured on this machine, scaled by the target's speedup
    device_hours: float
    cost: float
    budget: float

    @property
    def within_budget(self) -> bool:
        return self.cost <= self.budget

    def explain(self, currency: str) -> str:
        return (
            f"stage {self.stage} on {self.target}: {self.images:,} training images at "
            f"{self.images_per_second:.0f} img/s ≈ {self.device_hours * 60:.1f} device-minutes ≈ "
            f"{self.cost:.2f} {currency} (budget {self.budget:.2f} {currency})"
        )


def device_hours(seconds: float, target: ComputeTarget) -> float:
    """Billed device-hours: wall time × the devices held (a CPU-only target counts as one)."""
    return seconds / 3600.0 * max(1, target.gpus)


def estimate_training(
    stage: str,
    target_name: str,
    config: ProjectConfig,
    images: int,
    measured_images_per_second: float,
    budget: float,
    overhead: float = 1.5,
) -> Estimate:
    """Estimate a training stage's cost. ``overhead`` covers evaluation, export and robustness."""
    target = config.targets[target_name]
    rate = measured_images_per_second * target.speedup * max(1, target.gpus)
    seconds = images / max(rate, 1e-9) * overhead
    hours = device_hours(seconds, target)
    return Estimate(stage, target_name, images, rate, hours, hours * target.cost_per_hour, budget)


def check_budget(estimates: list[Estimate], budget: float, currency: str) -> None:
    """Refuse to start when the summed estimate is over budget, saying why."""
    total = sum(e.cost for e in estimates)
    if total > budget:
        detail = "\n".join("  " + e.explain(currency) for e in estimates)
        msg = (
            f"estimated cost {total:.2f} {currency} exceeds the budget of {budget:.2f} "
            f"{currency}; nothing was started.\n{detail}"
        )
        raise BudgetExceededError(msg)


def place_trials(n_trials: int, config: ProjectConfig) -> list[str]:
    """Hybrid policy: fill the sweep's on-prem target up to capacity, burst the rest to cloud.

    Trials run in waves of the on-prem capacity; with a burst target configured, trials beyond
    that capacity go to the cloud instead of waiting for a second wave.
    """
    home = config.sweep.target
    burst = config.sweep.burst_target
    capacity = config.targets[home].capacity
    if burst is None:
        return [home] * n_trials
    return [home if i < capacity else burst for i in range(n_trials)]
