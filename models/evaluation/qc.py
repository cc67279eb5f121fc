"""QC metrics as a QC lead reads them: escapes, false rejects, automation, per-type recall."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

OK = "ok"


def defect_scores(probs: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Defect score per part, s = 1 − p(ok); the review band thresholds live on this scale."""
    return 1.0 - probs[:, list(classes).index(OK)]


ANOMALY_CLASS = "defect_anomaly"  # the one defect class of a model that learned from good parts


def model_labels(model_classes: Sequence[str], data_classes: Sequence[str], labels: np.ndarray) -> np.ndarray:
    """Label indices of a dataset (``data_classes``) as indices of a model's classes.

    A classifier must predict the dataset's classes, in order. A model that learned from good
    parts only predicts ``ok`` / ``defect_anomaly``: every defect type is its defect class, so it
    is judged on the same parts as a classifier, by escapes, false rejects and automation.
    """
    model_classes, data_classes = list(model_classes), list(data_classes)
    if model_classes == data_classes:
        return labels
    if model_classes == [OK, ANOMALY_CLASS] and OK in data_classes:
        return (np.asarray(labels) != data_classes.index(OK)).astype(int)
    msg = f"the model predicts classes {model_classes}; the dataset has {data_classes}"
    raise ValueError(msg)


def verdicts(
    probs: np.ndarray, classes: Sequence[str], t_ok: float, t_defect: float
) -> tuple[np.ndarray, np.ndarray]:
    """(verdict, defect_type) per part: ok if s ≤ t_ok, defect if s ≥ t_defect, else review.

    The defect type is the most probable defect class, reported for defect and review verdicts.
    """
    s = defect_scores(probs, classes)
    verdict = np.where(s <= t_ok, "ok", np.where(s >= t_defect, "defect", "review"))
    ok_idx = list(classes).index(OK)
    defect_probs = probs.copy()
    defect_probs[:, ok_idx] = -1.0
    names: np.ndarray = np.array(classes, dtype=object)[defect_probs.argmax(1)]
    defect_type: np.ndarray = names.copy()
    defect_type[verdict == "ok"] = None
    return verdict, defect_type


def qc_metrics(
    probs: np.ndarray, labels: np.ndarray, classes: Sequence[str], t_ok: float, t_defect: float
) -> dict[str, Any]:
    """Every figure a QC lead asks for, from probabilities (N, C) and true label indices (N,).

    escape rate = defective parts passed as ok / defective parts;
    false reject rate = good parts judged defect / good parts (review is not a reject);
    automation rate = parts decided without a person / parts.
    """
    classes = list(classes)
    ok_idx = classes.index(OK)
    n = len(labels)
    verdict, _ = verdicts(probs, classes, t_ok, t_defect)
    defective = labels != ok_idx
    good = ~defective
    passed = verdict == "ok"
    flagged = verdict == "defect"
    review = verdict == "review"
    pred = probs.argmax(1) if n else np.zeros(0, dtype=int)
    cm = np.zeros((len(classes), len(classes)), dtype=int)
    np.add.at(cm, (labels, pred), 1)
    per_class_recall: dict[str, float | None] = {}
    catch_rate: dict[str, float | None] = {}
    for i, c in enumerate(classes):
        m = labels == i
        per_class_recall[c] = float((pred[m] == i).mean()) if m.any() else None
        if c != OK:
            # What matters on the line: the defect was not passed as ok (caught or sent to review).
            catch_rate[c] = float((~passed[m]).mean()) if m.any() else None
    return {
        "n": int(n),
        "n_defective": int(defective.sum()),
        "n_good": int(good.sum()),
        "escape_rate": _rate(passed & defective, defective),
        "false_reject_rate": _rate(flagged & good, good),
        "automation_rate": float((~review).mean()) if n else 0.0,
        "review_rate": float(review.mean()) if n else 0.0,
        "accuracy": float((pred == labels).mean()) if n else 0.0,
        "defect_auroc": defect_auroc(defect_scores(probs, classes), defective) if n else None,
        "error": float((pred != labels).mean()) if n else 0.0,
        "per_class_recall": per_class_recall,
        "defect_catch_rate": catch_rate,
        "confusion_matrix": cm.tolist(),
        "verdict_counts": {v: int((verdict == v).sum()) for v in ("ok", "defect", "review")},
    }


def defect_auroc(scores: np.ndarray, defective: np.ndarray) -> float | None:
    """Defect-vs-good AUROC of a score: the chance a defective part scores above a good one (ties
    count half). Threshold-free, so it compares models before any band is set. None without both."""
    from scipy.stats import rankdata

    y = np.asarray(defective, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(np.asarray(scores, dtype=np.float64))  # average ranks: ties count half
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _rate(hits: np.ndarray, base: np.ndarray) -> float:
    return float(hits.sum() / base.sum()) if base.sum() else 0.0


def sliced_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    t_ok: float,
    t_defect: float,
    groups: Mapping[str, Sequence[str | None]],
) -> dict[str, dict[str, dict[str, Any]]]:
    """The headline metrics per value of each slicing key (line, camera, variant)."""
    keys = ("n", "escape_rate", "false_reject_rate", "automation_rate", "accuracy")
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for key, values in groups.items():
        arr = np.array([v if v is not None else "unknown" for v in values], dtype=object)
        if len(arr) != len(labels):
            continue
        out[key] = {}
        for value in sorted(set(arr.tolist())):
            m = arr == value
            full = qc_metrics(probs[m], labels[m], classes, t_ok, t_defect)
            out[key][str(value)] = {k: full[k] for k in keys}
    return out


def escape_automation_curve(
    probs: np.ndarray, labels: np.ndarray, classes: Sequence[str], points: int = 101
) -> dict[str, list[float]]:
    """Escape rate vs automation rate as t_ok sweeps 0→1 with everything above t_ok reviewed.

    This is the trade-off a QC lead negotiates: pass more parts automatically, let more escape.
    """
    s = defect_scores(probs, classes)
    defective = labels != list(classes).index(OK)
    esc, auto, thr = [], [], []
    for t in np.linspace(0.0, 1.0, points):
        passed = s <= t
        esc.append(_rate(passed & defective, defective))
        auto.append(float(passed.mean()) if len(s) else 0.0)
        thr.append(float(t))
    return {"threshold": thr, "escape_rate": esc, "automation_rate": auto}
