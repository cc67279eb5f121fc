"""Review band: the escape-rate guarantee holds on held-back parts, and the band stays useful."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kensa.models.evaluation.thresholds import (
    NO_AUTO_FLAG,
    NO_AUTO_PASS,
    apply_band,
    calibrate_band,
    n_needed,
)

# A fixed "model": defect scores of good parts ~ Beta(1, 12) (mostly near 0), of defective parts
# ~ Beta(3, 1.5) (mostly near 1, with a lower tail that overlaps the good parts).
GOOD, DEFECTIVE = (1.0, 12.0), (3.0, 1.5)
ALPHA, DELTA, MAX_FR = 0.01, 0.1, 0.05


def _draw(rng: np.random.Generator, n_good: int, n_defective: int) -> tuple[np.ndarray, np.ndarray]:
    scores = np.concatenate([rng.beta(*GOOD, n_good), rng.beta(*DEFECTIVE, n_defective)])
    is_defective = np.concatenate([np.zeros(n_good, bool), np.ones(n_defective, bool)])
    return scores, is_defective


def test_guarantee_holds_on_held_back_parts() -> None:
    seeds, n_test = 400, 20_000
    escape_violations = fr_violations = naive_violations = 0
    automation = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        scores, is_defective = _draw(rng, 1500, 300)
        band = calibrate_band(scores, is_defective, ALPHA, DELTA, MAX_FR)
        assert band.guaranteed, band.message
        test_defective = rng.beta(*DEFECTIVE, n_test)
        test_good = rng.beta(*GOOD, n_test)
        escape_violations += int(np.mean(test_defective <= band.t_ok) > ALPHA)
        fr_violations += int(np.mean(test_good >= band.t_defect) > MAX_FR)
        automation.append(band.automation_rate)
        # The plug-in rule a guarantee replaces: the largest t_ok with calibration escape rate
        # <= alpha. It must fail often here, or this test could not tell a broken guarantee.
        d = np.sort(scores[is_defective])
        naive_t_ok = d[math.floor(ALPHA * d.size)] - 1e-12
        naive_violations += int(np.mean(test_defective <= naive_t_ok) > ALPHA)

    # Monte-Carlo slack: three binomial standard deviations of the violation frequency.
    slack = 3 * math.sqrt(DELTA * (1 - DELTA) / seeds)
    assert escape_violations / seeds <= DELTA + slack
    assert fr_violations / seeds <= DELTA + slack
    assert naive_violations / seeds > 0.3
    # Most parts are still decided without a person (the band is not "everything to review").
    assert np.mean(automation) > 0.7


def test_too_few_defective_parts_says_so_and_passes_nothing() -> None:
    rng = np.random.default_rng(1)
    scores, is_defective = _draw(rng, 1500, 50)
    band = calibrate_band(scores, is_defective, ALPHA, DELTA, MAX_FR)
    needed = n_needed(ALPHA, DELTA)
    assert needed == 230  # ln 0.1 / ln 0.99 = 229.1
    assert not band.guaranteed and not band.escape_guaranteed
    assert band.n_defective == 50 and band.n_defective_needed == needed
    assert "50" in band.message and str(needed) in band.message and "NOT GUARANTEED" in band.message
    # Conservative: nothing passes automatically, here or on new parts.
    assert band.t_ok == NO_AUTO_PASS and band.escape_rate == 0.0
    assert "ok" not in set(apply_band(rng.beta(*GOOD, 1000), band.t_ok, band.t_defect))
    # More evidence never gives less automation: the same data with 300 defectives passes parts.
    more = calibrate_band(*_draw(np.random.default_rng(1), 1500, 300), ALPHA, DELTA, MAX_FR)
    assert more.guaranteed and more.t_ok > band.t_ok and more.automation_rate > band.automation_rate


def test_certification_starts_exactly_at_n_needed() -> None:
    # All defectives scored high, so zero calibration escapes: only the count decides.
    needed = n_needed(ALPHA, DELTA)
    assert (1 - ALPHA) ** needed <= DELTA < (1 - ALPHA) ** (needed - 1)
    good = np.linspace(0.0, 0.3, 200)
    for n, expected in ((needed - 1, False), (needed, True)):
        scores = np.concatenate([good, np.full(n, 0.9)])
        is_defective = np.arange(scores.size) >= good.size
        assert calibrate_band(scores, is_defective, ALPHA, DELTA, MAX_FR).guaranteed is expected


def test_no_good_parts_flags_nothing() -> None:
    band = calibrate_band(np.linspace(0.5, 1.0, 300), np.ones(300, bool), ALPHA, DELTA, MAX_FR)
    assert band.t_defect == NO_AUTO_FLAG and not band.false_reject_guaranteed
    assert "have 0" in band.message


def test_separable_scores_are_fully_automated() -> None:
    rng = np.random.default_rng(2)
    scores = np.concatenate([rng.uniform(0.0, 0.3, 500), rng.uniform(0.7, 1.0, 500)])
    is_defective = np.arange(1000) >= 500
    band = calibrate_band(scores, is_defective, ALPHA, DELTA, MAX_FR)
    assert band.guaranteed
    assert band.automation_rate >= 0.99 and band.review_rate <= 0.01
    assert band.escape_rate == 0.0 and band.false_reject_rate == 0.0
    verdicts = apply_band(rng.uniform(0.7, 1.0, 1000), band.t_ok, band.t_defect)
    assert (verdicts == "defect").all()


def test_stricter_alpha_never_raises_t_ok() -> None:
    alphas = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2]
    for seed in range(20):
        scores, is_defective = _draw(np.random.default_rng(100 + seed), 1000, 400)
        t_oks = [calibrate_band(scores, is_defective, a, DELTA, MAX_FR).t_ok for a in alphas]
        assert all(a <= b for a, b in zip(t_oks, t_oks[1:], strict=False)), t_oks
        assert t_oks[-1] > t_oks[0]  # the sweep actually moves the threshold


def test_report_is_json_and_consistent() -> None:
    scores, is_defective = _draw(np.random.default_rng(3), 1500, 300)
    band = calibrate_band(scores, is_defective, ALPHA, DELTA, MAX_FR)
    d = json.loads(json.dumps(band.to_dict()))
    assert d["t_ok"] <= d["t_defect"]
    assert d["n_good"] == 1500 and d["n_defective"] == 300
    assert math.isclose(d["automation_rate"] + d["review_rate"], 1.0)
    verdicts = apply_band(scores, band.t_ok, band.t_defect)
    assert math.isclose(np.mean(verdicts == "review"), band.review_rate)
    assert math.isclose(np.mean(verdicts[is_defective] == "ok"), band.escape_rate)
    assert band.escape_rate <= ALPHA


def test_apply_band_rule_and_bad_input() -> None:
    v = apply_band([0.0, 0.2, 0.5, 0.8, 1.0], 0.2, 0.8)
    assert list(v) == ["ok", "ok", "review", "defect", "defect"]
    assert list(apply_band([0.5], 0.5, 0.5)) == ["ok"]  # empty band: ok wins the tie
    with pytest.raises(ValueError, match="t_ok"):
        apply_band([0.5], 0.6, 0.4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        apply_band([1.5], 0.2, 0.8)
    with pytest.raises(ValueError, match="alpha"):
        calibrate_band([0.1, 0.9], [False, True], alpha=0.0)
    with pytest.raises(ValueError, match="shape"):
        calibrate_band([0.1, 0.9], [False])
    with pytest.raises(ValueError, match="empty"):
        calibrate_band([], [])
