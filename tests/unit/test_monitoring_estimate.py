"""Label-free escape-rate estimate: it tracks the truth in distribution and says when it cannot."""

from __future__ import annotations

import numpy as np
import pytest
from monitoring_helpers import THRESHOLDS, make_parts

from kensa.monitoring.estimate import estimate_window, fit_calibrator
from kensa.monitoring.features import SCALAR_COLUMNS
from kensa.monitoring.policy import calibrate

SCORE = SCALAR_COLUMNS.index("defect_score")


def _true_rates(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    defective = labels > 0
    escape = float((defective & (scores <= THRESHOLDS["t_ok"])).sum() / defective.sum())
    false_reject = float((~defective & (scores >= THRESHOLDS["t_defect"])).sum() / (~defective).sum())
    return escape, false_reject


def test_estimate_tracks_the_true_escape_and_false_reject_rates_in_distribution() -> None:
    rng = np.random.default_rng(0)
    ref = make_parts(rng, 2000).table()
    calibrator = fit_calibrator(ref.scalars[:, SCORE], ref.labels > 0)  # type: ignore[operator]
    errors = []
    for seed in range(5):
        window = make_parts(np.random.default_rng(100 + seed), 4000).table()
        scores = window.scalars[:, SCORE]
        est = estimate_window(scores, calibrator, **THRESHOLDS)
        escape, false_reject = _true_rates(scores, window.labels)  # type: ignore[arg-type]
        assert est.reliable and est.reason is None
        assert est.escape_rate_low <= escape <= est.escape_rate_high  # type: ignore[operator]
        errors.append(abs(est.expected_escape_rate - escape))  # type: ignore[operator]
        assert est.expected_false_reject_rate == pytest.approx(false_reject, abs=0.01)
        assert est.expected_defect_share == pytest.approx(0.2, abs=0.03)
    assert np.mean(errors) < 0.01


def test_estimate_on_drifted_inputs_is_flagged_unreliable_because_it_is_wrong() -> None:
    rng = np.random.default_rng(1)
    ref = make_parts(rng, 1000)
    table = ref.table()
    calibrator = fit_calibrator(table.scalars[:, SCORE], ref.labels > 0)
    policy = calibrate(table, window=400, stride=100, n_boot=3000)
    # Defocus: sharpness halves and defects stop standing out, so many now score like ok parts.
    blurred = make_parts(rng, 400, shift={"sharpness": 0.5}, score_blur=0.9).table()
    level = policy.score(blurred).level
    scores = blurred.scalars[:, SCORE]
    est = estimate_window(scores, calibrator, drift_level=level, **THRESHOLDS)
    true_escape, _ = _true_rates(scores, blurred.labels)  # type: ignore[arg-type]
    # The estimate, blind to the change, misses most escapes ...
    assert true_escape > est.expected_escape_rate + 0.2  # type: ignore[operator]
    # ... and the drift policy on the same window is what says so.
    assert level == "critical"
    assert not est.reliable and "drifted" in (est.reason or "")


def test_a_window_with_almost_no_defectives_is_unreliable_and_empty_ones_refused() -> None:
    ref = make_parts(np.random.default_rng(2), 1000).table()
    calibrator = fit_calibrator(ref.scalars[:, SCORE], ref.labels > 0)  # type: ignore[operator]
    est = estimate_window(np.full(50, 0.01), calibrator, **THRESHOLDS)
    assert not est.reliable and "defective parts expected" in (est.reason or "")
    with pytest.raises(ValueError, match="empty window"):
        estimate_window(np.array([]), calibrator, **THRESHOLDS)
