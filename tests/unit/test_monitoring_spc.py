"""SPC p-charts: Western Electric rules, limits within the false-alarm budget, a real jump caught."""

from __future__ import annotations

import numpy as np
import pytest

from kensa.monitoring.spc import calibrate_chart, subgroup_counts, western_electric


def _rules(z: list[float], **kw: object) -> list[tuple[int, str, str]]:
    return [(h.index, h.rule, h.side) for h in western_electric(np.array(z), **kw)]  # type: ignore[arg-type]


def test_each_western_electric_rule_fires_on_its_pattern_and_only_there() -> None:
    calm = [0.3, -0.2, 0.1, -0.4, 0.2, -0.1]
    assert _rules(calm) == []
    assert _rules([*calm, 3.4]) == [(6, "rule1", "high")]
    assert _rules([*calm, -2.3, 0.5, -2.1]) == [(8, "rule2", "low")]
    assert _rules([*calm, 1.2, 1.5, 0.4, 1.1, 1.3]) == [(10, "rule3", "high")]
    run = [0.2, 0.5, 0.3, 0.1, 0.6, 0.4, 0.2, 0.3]
    assert _rules([-0.5, *run]) == [(8, "rule4", "high")]
    assert _rules([-0.5, *run], run_rule=False) == []
    # A pattern is reported once, at the point that completes it, not again for older points.
    assert _rules([*calm, 2.5, 2.2, 0.0]) == [(7, "rule2", "high")]
    # Zones scale with k: the same excursion is inside the limits of a chart calibrated wider.
    assert _rules([*calm, 3.4], k=1.2) == []


def test_limits_keep_in_control_streams_within_budget_and_catch_a_doubled_defect_rate() -> None:
    chart = calibrate_chart("defect_rate", 0.15, 600, subgroup=200, false_alarm_per_10k=1.0, seed=0)
    rng = np.random.default_rng(4)
    parts = 200 * 1500  # 300,000 in-control parts
    flags = rng.random(parts) < 0.15
    counts, sizes = subgroup_counts(flags, 200)
    hits = chart.check(counts, sizes)
    assert len({h.index for h in hits}) / parts * 10_000 <= 1.0
    lcl, ucl = chart.limits(200)
    assert lcl < 0.15 < ucl
    # The line starts making twice as many defects: caught within the first three subgroups.
    worse = rng.random(200 * 3) < 0.30
    counts, sizes = subgroup_counts(np.concatenate([flags[-200 * 8 :], worse]), 200)
    new_hits = [h for h in chart.check(counts, sizes) if h.index >= 8]
    assert new_hits and new_hits[0].side == "high"
    assert new_hits[0].level == "critical"


def test_a_small_reference_widens_the_chart_and_turns_off_the_run_rule() -> None:
    small = calibrate_chart("review_rate", 0.2, 72, subgroup=200)
    large = calibrate_chart("review_rate", 0.2, 5000, subgroup=200)
    assert not small.run_rule and large.run_rule
    assert small.limits(200)[1] > large.limits(200)[1]


def test_subgroups_are_complete_and_bad_inputs_refused() -> None:
    counts, sizes = subgroup_counts(np.array([1, 0, 1, 1, 0, 0, 1]), 3)
    assert counts.tolist() == [2, 1] and sizes.tolist() == [3, 3]
    with pytest.raises(ValueError, match="subgroups"):
        calibrate_chart("defect_rate", 0.1, 0, subgroup=10)
