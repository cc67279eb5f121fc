"""The cost ledger: device-hours and cost per run, stage and model version, in the store and MLflow."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from mlflow.tracking import MlflowClient
from sqlalchemy import select

from kensa.settings import Settings
from kensa.store.connect import open_store
from kensa.store.models import CostEntry


@dataclass(frozen=True)
class LedgerLine:
    run_id: str
    stage: str
    target: str
    model_version: str | None
    device_hours: float
    cost: float
    currency: str
    created_at: datetime | None = None


def record_cost(settings: Settings, line: LedgerLine, client: MlflowClient | None = None) -> None:
    """Write one ledger line to the store and, when a client is given, to the MLflow run."""
    factory = open_store(settings)
    with factory() as session:
        session.add(
            CostEntry(
                run_id=line.run_id,
                stage=line.stage,
                target=line.target,
                model_version=line.model_version,
                device_hours=line.device_hours,
                cost=line.cost,
                currency=line.currency,
            )
        )
        session.commit()
    if client is not None:
        client.log_metric(line.run_id, "cost.device_hours", line.device_hours)
        client.log_metric(line.run_id, "cost.amount", line.cost)
        client.set_tag(line.run_id, "kensa.cost.target", line.target)
        client.set_tag(line.run_id, "kensa.cost.currency", line.currency)


def attach_model_version(settings: Settings, run_ids: list[str], version: str) -> None:
    """Once a model is registered, its ledger lines say which version they paid for."""
    factory = open_store(settings)
    with factory() as session:
        for entry in session.scalars(select(CostEntry).where(CostEntry.run_id.in_(run_ids))):
            entry.model_version = version
        session.commit()


def read_ledger(settings: Settings, model_version: str | None = None) -> list[LedgerLine]:
    factory = open_store(settings)
    with factory() as session:
        query = select(CostEntry).order_by(CostEntry.id)
        if model_version is not None:
            query = query.where(CostEntry.model_version == model_version)
        return [
            LedgerLine(
                e.run_id,
                e.stage,
                e.target,
                e.model_version,
                e.device_hours,
                e.cost,
                e.currency,
                e.created_at,
            )
            for e in session.scalars(query)
        ]
