"""Evidently on a drift window: its default per-column tests, its embeddings drift, its HTML report.

The per-column tests and the embeddings method are called the way Evidently's ``DataDriftPreset``
and ``EmbeddingsDrift`` choose them by default (K-S under 1,000 reference rows, Wasserstein
above; a classifier's ROC AUC on the embedding, bootstrapped under 1,000 rows), but directly, so a
window costs milliseconds instead of the seconds a full report takes; the full report is rendered
only for windows someone will look at.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kensa.monitoring.features import SCALAR_COLUMNS, FeatureTable

log = logging.getLogger("kensa.monitoring.report")


def frame(table: FeatureTable) -> pd.DataFrame:
    """The table as Evidently reads it: one column per scalar and per embedding dimension."""
    data = np.concatenate([table.scalars, table.embedding], axis=1)
    return pd.DataFrame(data, columns=[*SCALAR_COLUMNS, *table.embedding_columns])


def column_scores(reference: FeatureTable, window: FeatureTable) -> list[dict[str, Any]]:
    """Evidently's default drift test on every scalar column (what ``DataDriftPreset`` runs)."""
    from evidently.legacy.calculations.stattests.registry import get_stattest
    from evidently.legacy.core import ColumnType

    ref, cur = frame(reference), frame(window)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in SCALAR_COLUMNS:
            test = get_stattest(ref[name], cur[name], ColumnType.Numerical, None)
            result = test(ref[name], cur[name], ColumnType.Numerical, None)
            out.append(
                {
                    "column": name,
                    "method": test.name,
                    "score": float(result.drift_score),
                    "threshold": float(result.actual_threshold),
                    "drifted": bool(result.drifted),
                }
            )
    return out


def embedding_drift(reference: FeatureTable, window: FeatureTable) -> dict[str, Any]:
    """Evidently's default embeddings drift (``EmbeddingsDrift`` without a method)."""
    from evidently.legacy.metrics.data_drift.embedding_drift_methods import model

    cols = list(reference.embedding_columns)
    if not cols:
        return {"method": "model", "score": None, "drifted": False}
    ref = pd.DataFrame(reference.embedding, columns=cols)
    cur = pd.DataFrame(window.embedding, columns=cols)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score, drifted, method = model(bootstrap=len(ref) < 1000)(cur, ref)
    return {"method": method, "score": float(score), "drifted": bool(drifted)}


def evidently_defaults(
    reference: FeatureTable, window: FeatureTable, *, drift_share: float = 0.5
) -> dict[str, Any]:
    """Evidently's own verdicts at its default settings, kept beside kensa's for comparison."""
    columns = column_scores(reference, window)
    share = sum(c["drifted"] for c in columns) / len(columns)
    return {
        "columns": columns,
        "drift_share": share,
        "dataset_drift": share >= drift_share,
        "embeddings": embedding_drift(reference, window),
    }


def write_report(
    reference: FeatureTable, window: FeatureTable, path: Path, *, embedding_dims: int = 4
) -> Path:
    """Render Evidently's data-drift report of a window as HTML: scalars and the embedding dimensions
    whose mean moved most.

    Embedding dimensions are shown as numerical columns: Evidently's ``EmbeddingsDrift`` widget
    draws a t-SNE of reference and window, which costs minutes on a small CPU, and every column's
    plots cost about a second; the embedding's drift score is computed anyway
    (``embedding_drift``) and kept with the alert.
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    moved: list[str] = []
    if reference.embedding.shape[1] and embedding_dims > 0:
        sd = np.maximum(reference.embedding.std(axis=0), 1e-12)
        shift = np.abs(window.embedding.mean(axis=0) - reference.embedding.mean(axis=0)) / sd
        names = reference.embedding_columns
        moved = [names[i] for i in np.argsort(-shift)[:embedding_dims]]
    columns = [*SCALAR_COLUMNS, *moved]
    definition = DataDefinition(numerical_columns=columns)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snapshot = Report([DataDriftPreset(columns=columns)]).run(
            Dataset.from_pandas(frame(window), data_definition=definition),
            Dataset.from_pandas(frame(reference), data_definition=definition),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.html")
        snapshot.save_html(str(tmp))
        tmp.replace(path)
    log.info("drift_report", extra={"path": str(path), "rows": len(window)})
    return path
