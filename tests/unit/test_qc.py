"""QC metrics on hand-made scores, where every figure can be checked by counting."""

from __future__ import annotations

import numpy as np

from kensa.models.evaluation.qc import escape_automation_curve, qc_metrics, sliced_metrics, verdicts

CLASSES = ["ok", "defect_scratch", "defect_dent"]


def _probs(p_ok: list[float], second: list[int]) -> np.ndarray:
    out = np.zeros((len(p_ok), 3))
    out[:, 0] = p_ok
    out[np.arange(len(p_ok)), second] = 1 - np.array(p_ok)
    return out


def test_escape_false_reject_and_automation_are_counted_as_a_qc_lead_would() -> None:
    # scores s = 1 - p_ok: 0.05 (ok), 0.5 (review), 0.95 (defect)
    probs = _probs([0.95, 0.95, 0.5, 0.05, 0.95, 0.05], [1, 1, 1, 2, 2, 1])
    labels = np.array([0, 0, 0, 0, 1, 2])  # four good parts, two defective
    m = qc_metrics(probs, labels, CLASSES, t_ok=0.2, t_defect=0.8)
    assert m["escape_rate"] == 0.5  # the scratch part scored 0.05 was passed
    assert m["false_reject_rate"] == 0.25  # one good part of four judged defect
    assert m["automation_rate"] == 5 / 6  # one part in the review band
    assert m["verdict_counts"] == {"ok": 3, "defect": 2, "review": 1}
    assert m["defect_catch_rate"]["defect_dent"] == 1.0
    assert m["defect_catch_rate"]["defect_scratch"] == 0.0


def test_defect_type_is_most_likely_defect_and_absent_for_ok() -> None:
    probs = np.array([[0.9, 0.06, 0.04], [0.1, 0.2, 0.7]])
    verdict, dtype = verdicts(probs, CLASSES, 0.2, 0.8)
    assert verdict.tolist() == ["ok", "defect"]
    assert dtype.tolist() == [None, "defect_dent"]


def test_slices_split_the_same_counts() -> None:
    probs = _probs([0.95, 0.05, 0.95, 0.05], [1, 1, 1, 1])
    labels = np.array([0, 1, 0, 1])
    s = sliced_metrics(probs, labels, CLASSES, 0.2, 0.8, {"camera": ["C1", "C1", "C2", "C2"]})
    assert s["camera"]["C1"]["n"] == 2 and s["camera"]["C2"]["n"] == 2
    assert s["camera"]["C1"]["escape_rate"] == 0.0


def test_curve_trades_escapes_for_automation() -> None:
    rng = np.random.default_rng(0)
    p_ok = rng.uniform(size=200)
    probs = _probs(p_ok.tolist(), [1] * 200)
    labels = (p_ok < 0.5).astype(int)
    curve = escape_automation_curve(probs, labels, CLASSES)
    assert curve["automation_rate"][0] <= curve["automation_rate"][-1] == 1.0
    assert curve["escape_rate"][-1] == 1.0
    assert all(np.diff(curve["escape_rate"]) >= 0)


def test_defect_auroc_is_the_rank_probability_with_ties_half() -> None:
    from kensa.models.evaluation.qc import defect_auroc

    assert defect_auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert defect_auroc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert defect_auroc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5
    # 3 of 4 (defective, good) pairs ordered right.
    assert defect_auroc(np.array([0.1, 0.6, 0.5, 0.9]), np.array([0, 0, 1, 1])) == 0.75
    assert defect_auroc(np.array([0.1, 0.2]), np.array([0, 0])) is None
