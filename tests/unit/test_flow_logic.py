"""The decisions inside the flows, on hand-made numbers: config errors, gate, budget, choice."""

from __future__ import annotations

from pathlib import Path

import pytest

from kensa.flows.choose import Trial, choose, tco
from kensa.flows.compute import BudgetExceededError, check_budget, estimate_training, place_trials
from kensa.flows.config import ConfigError, load_project_config, parse_project_config
from kensa.flows.gate import evaluate_gate
from kensa.models.evaluation.scaling import effective_robustness, fit_power_law


def _trial(key: str, tco_value: float, meets: bool, params: int = 1_000_000) -> Trial:
    return Trial(
        key=key,
        model=key.split("@")[0],
        fraction=1.0,
        parameters=params,
        train_images=1000,
        clean_error=0.1,
        corrupted_error=0.2,
        escape_rate=0.01,
        corrupted_escape_rate=0.02,
        training_cost=tco_value / 2,
        serving_cost_per_million=tco_value / 2,
        tco=tco_value,
        meets_kpi=meets,
    )


def test_sweep_picks_the_cheapest_configuration_that_meets_the_kpi() -> None:
    # A synthetic cost table: the cheapest trial misses the KPI, so the next cheapest wins.
    table = [
        _trial("tiny@0.5", 1.0, False),
        _trial("small@1", 3.0, True),
        _trial("large@1", 9.0, True, 25_000_000),
        _trial("mid@1", 2.5, True, 4_000_000),
    ]
    assert choose(table).key == "mid@1"  # type: ignore[union-attr]
    assert choose([_trial("a@1", 1.0, False)]) is None
    # Equal cost: the smaller model.
    tie = [_trial("big@1", 2.0, True, 9_000_000), _trial("small@1", 2.0, True, 1_000_000)]
    assert choose(tie).key == "small@1"  # type: ignore[union-attr]


def test_tco_adds_serving_over_the_planned_life() -> None:
    assert tco(10.0, 0.5, planned_millions=18.25) == pytest.approx(10.0 + 9.125)


def test_budget_overrun_names_the_stage_and_the_numbers() -> None:
    config = load_project_config(None)
    est = estimate_training(
        "sweep:resnet50@1",
        "cloud-gpu",
        config,
        images=1_000_000,
        measured_images_per_second=10.0,
        budget=1.0,
    )
    assert not est.within_budget
    with pytest.raises(BudgetExceededError) as err:
        check_budget([est], 1.0, "USD")
    assert "resnet50" in str(err.value) and "exceeds the budget of 1.00 USD" in str(err.value)


def test_hybrid_placement_bursts_beyond_onprem_capacity() -> None:
    config = parse_project_config(
        {
            "targets": {
                "onprem-gpu": {"work_pool": "onprem-gpu", "cost_per_hour": 0.5, "capacity": 2},
                "cloud-gpu": {"work_pool": "cloud-gpu", "kind": "cloud", "cost_per_hour": 3.0},
            }
        }
    )
    assert place_trials(5, config) == ["onprem-gpu"] * 2 + ["cloud-gpu"] * 3
    no_burst = parse_project_config({**config.model_dump(), "sweep": {"burst_target": None}})
    assert place_trials(3, no_burst) == ["onprem-gpu"] * 3


def test_bad_config_names_each_field(tmp_path: Path) -> None:
    path = tmp_path / "kensa.toml"
    path.write_text('[kpi]\nmax_escape_rate = 2\n[pilot]\ntarget = "mars"\nepochs = 0\n')
    with pytest.raises(ConfigError) as err:
        load_project_config(path)
    text = str(err.value)
    assert "kpi.max_escape_rate" in text and "pilot.epochs" in text
    path.write_text('[sweep]\nburst_target = "moon"\n')
    with pytest.raises(ConfigError, match="burst_target = 'moon' is not a compute target"):
        load_project_config(path)
    path.write_text("[kpi\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_project_config(path)
    path.write_text("[kpi]\nmax_escape_rat = 0.1\n")
    with pytest.raises(ConfigError, match="max_escape_rat"):
        load_project_config(path)
    # No project can let its auditors or a line's machine key approve models.
    path.write_text('[approval]\napprover_roles = ["operator", "auditor", "line"]\n')
    with pytest.raises(ConfigError, match="'auditor', 'line' cannot approve"):
        load_project_config(path)


def test_gate_reports_the_gap_for_each_missed_kpi() -> None:
    kpi = load_project_config(None).kpi
    metrics = {
        "escape_rate": 0.08,
        "false_reject_rate": 0.01,
        "automation_rate": 0.9,
        "band": {"guaranteed": True, "message": ""},
    }
    gate = evaluate_gate(metrics, kpi)
    assert not gate.passed
    assert gate.gaps == ["escape rate 8.00% vs target ≤ 5.00% (off by 3.00%)"]
    assert "| escape rate | ≤ 5.00% | 8.00% | ❌ |" in gate.markdown("Pilot")
    uncertified = {**metrics, "escape_rate": 0.0, "band": {"guaranteed": False, "message": "few"}}
    assert evaluate_gate(uncertified, kpi).gaps == ["review band not certified: few"]


def test_gate_reads_test_split_rates_as_a_check_of_the_certificate_not_a_coin_toss() -> None:
    kpi = load_project_config(None).kpi  # ≤ 5 % at 90 % confidence
    base = {"escape_rate": 0.02, "automation_rate": 0.9, "band": {"guaranteed": True}}
    # 41 of 796 good parts: 5.15 %, well within the noise of a certified 5 % rate.
    noisy = evaluate_gate({**base, "false_reject_rate": 41 / 796, "n_good": 796}, kpi)
    assert noisy.passed
    fr_row = next(r for r in noisy.rows if r.kpi == "false reject rate")
    assert fr_row.achieved.startswith("5.15% (41/796), within sampling: 90% lower bound 4.")
    # 60 of 796 (7.5 %): the lower bound is above 5 %, so the test split contradicts the band.
    broken = evaluate_gate({**base, "false_reject_rate": 60 / 796, "n_good": 796}, kpi)
    assert not broken.passed
    assert broken.gaps[0].startswith("false reject rate 7.54% (60 of 796 test parts) vs target")


def test_gate_on_good_parts_only_evidence_names_what_the_labels_cannot_show() -> None:
    kpi = load_project_config(None).kpi
    anomaly = {
        "kind": "anomaly",
        "escape_rate": None,  # no defective test part
        "false_reject_rate": 0.02,
        "n_good": 300,
        "n_defective": 0,
        "automation_rate": 0.9,
        "band": {"guaranteed": False, "message": "ESCAPE RATE NOT CERTIFIED: ... 45 defective ..."},
    }
    gate = evaluate_gate(anomaly, kpi)
    assert not gate.passed
    rows = {r.kpi: r for r in gate.rows}
    assert rows["escape rate"].achieved == "unknown" and not rows["escape rate"].passed
    assert "no defective parts" in rows["escape rate"].gap
    assert rows["false reject rate"].passed and rows["automation rate"].passed
    assert "ESCAPE RATE NOT CERTIFIED" in rows["escape guarantee"].gap


def test_power_law_recovers_a_known_curve_and_refuses_to_invent_one() -> None:
    xs = [1e6, 2e6, 4e6, 11e6, 25e6]
    ys = [0.5 * (x / 1e6) ** -0.4 + 0.05 for x in xs]
    law = fit_power_law(xs, ys)
    assert law.fitted and law.b == pytest.approx(0.4, abs=0.02)
    assert law.c == pytest.approx(0.05, abs=0.01)
    assert float(law(8e6)) == pytest.approx(0.5 * 8**-0.4 + 0.05, rel=0.02)
    two = fit_power_law([1e6, 4e6], [0.4, 0.2])
    assert not two.fitted and "two x values" in two.note


def test_effective_robustness_is_distance_above_the_robustness_line() -> None:
    er = effective_robustness([0.1, 0.2, 0.3], [0.2, 0.3, 0.3])
    assert er["slope"] is not None
    assert er["per_trial"][2] > 0 > er["per_trial"][1]  # the last model degrades least


def test_sweep_grid_crosses_pretrained_models_with_every_rung_and_names_the_rung_only_when_needed() -> None:
    from kensa.flows.sweep import sweep_grid

    sweep = {
        "models": ["efficientnet_lite0", "tiny_cnn"],
        "finetunes": ["head", "last"],
        "fractions": [0.5, 1.0],
    }
    config = parse_project_config({"sweep": sweep})
    grid = dict(sweep_grid(config.sweep))
    assert grid == {
        "efficientnet_lite0/head@0.5": ("efficientnet_lite0", "head", 0.5),
        "efficientnet_lite0/head@1": ("efficientnet_lite0", "head", 1.0),
        "efficientnet_lite0/last@0.5": ("efficientnet_lite0", "last", 0.5),
        "efficientnet_lite0/last@1": ("efficientnet_lite0", "last", 1.0),
        "tiny_cnn@0.5": ("tiny_cnn", None, 0.5),  # from scratch: one rung, none named
        "tiny_cnn@1": ("tiny_cnn", None, 1.0),
    }
    one_rung = parse_project_config({"sweep": {"models": ["mobilenet_v2"], "fractions": [1.0]}})
    assert [k for k, _ in sweep_grid(one_rung.sweep)] == ["mobilenet_v2@1"]


def test_a_cached_rung_pays_its_trunk_once_not_every_epoch() -> None:
    from kensa.models.train.speed import TrainSpeed, measure_train_speed

    cached = TrainSpeed(
        "efficientnet_lite0", "head", step_images_per_second=100.0, extract_images_per_second=10.0
    )
    # 1,000 images: 100 s through the frozen trunk once, then 10 s of head steps per epoch.
    assert cached.seconds(1000, 20) == pytest.approx(100 + 200)
    assert cached.effective_rate(1000, 20) == pytest.approx(20_000 / 300)
    full = TrainSpeed("efficientnet_lite0", "all", step_images_per_second=10.0)
    assert full.seconds(1000, 20) == pytest.approx(2000)
    # Measured: the pretrained default rung times its trunk and its head apart; scratch does not.
    head = measure_train_speed("efficientnet_lite0", 64, 3, steps=1, batch_size=4)
    assert head.finetune == "head" and head.extract_images_per_second is not None
    scratch = measure_train_speed("tiny_cnn", 64, 3, steps=1, batch_size=4)
    assert scratch.finetune == "all" and scratch.extract_images_per_second is None
