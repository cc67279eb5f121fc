"""The staged flow on the embedded default: KPI gate, budget refusal, sweep choice, approvals, DDP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from config_helpers import LENIENT_KPI
from mlflow.tracking import MlflowClient
from sqlalchemy import select
from typer.testing import CliRunner

from kensa.cli.common import get_settings
from kensa.cli.main import app
from kensa.registry import ALIAS_CANDIDATE, ALIAS_CHAMPION, TAG_REGISTERED_BY, TAG_STATUS
from kensa.settings import Settings
from kensa.store.audit import verify_chain
from kensa.store.connect import open_store
from kensa.store.models import AuditEvent, CostEntry

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LENIENT = f"""
name = "qc-test"
{LENIENT_KPI}max_relative_ce = 1000
[pilot]
model = "small_cnn"
epochs = 1
fraction = 0.4
[sweep]
models = ["mobilenet_v3_small", "mobilenet_v3_large"]
fractions = [0.5, 1.0]
epochs = 1
max_robustness_images = 24
"""


@pytest.fixture(scope="module", autouse=True)
def prefect_api(prefect_harness: None) -> None:
    """The session's Prefect API (see tests/conftest.py)."""


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """A fresh data dir (store, MLflow, runs) for one test, as a user's environment would set it."""
    monkeypatch.setenv("KENSA_DATA_DIR", str(tmp_path / "kensa"))
    get_settings.cache_clear()
    settings = Settings()
    from kensa.flows.tracking import configure_mlflow

    configure_mlflow(settings)
    return settings


def write_config(tmp_path: Path, text: str, **replace: str) -> Path:
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / "kensa.toml"
    path.write_text(text)
    return path


def _runs(name: str | None = None) -> list[mlflow.entities.Run]:
    exp = MlflowClient().get_experiment_by_name("kensa")
    if exp is None:
        return []
    runs = MlflowClient().search_runs([exp.experiment_id])
    return [r for r in runs if name is None or r.info.run_name == name]


def test_unreachable_kpi_stops_before_the_sweep(tiny_line: Path, tmp_path: Path, env: Settings) -> None:
    from kensa.flows.gate import GateFailedError
    from kensa.flows.pilot import pilot

    config = write_config(
        tmp_path,
        LENIENT,
        # α = 0.01 % at 90 % confidence needs 23,025 defective calibration parts; the tiny line
        # has a few dozen, whatever the model learned, so this KPI cannot be met.
        **{"max_escape_rate = 0.99": "max_escape_rate = 0.0001"},
    )
    with pytest.raises(GateFailedError) as err:
        pilot(data=str(tiny_line), config_path=str(config))
    message = str(err.value)
    assert "review band not certified" in message and "at least 23025 are needed" in message
    assert "no scale spend" in message
    (run,) = _runs("pilot")
    assert run.data.tags["kensa.gate"] == "failed"
    assert "at least 23025 are needed" in run.data.tags["kensa.gate.message"]
    assert _runs("sweep") == []  # nothing was spent on scale
    with open_store(env)() as session:
        stages = [c.stage for c in session.scalars(select(CostEntry))]
    assert stages == ["pilot"]
    assert MlflowClient().search_registered_models() == []


def test_sweep_takes_over_the_pilots_trial_instead_of_paying_twice(
    tiny_line: Path, tmp_path: Path, env: Settings
) -> None:
    from kensa.flows.pilot import pilot

    # The pilot (tiny_cnn on half the data, 1 epoch) is one point of this grid; the other point
    # (4× the FLOPs) is dearer to train and to serve, so the reused trial is chosen and registered.
    config = write_config(
        tmp_path,
        LENIENT,
        **{
            'model = "small_cnn"': 'model = "tiny_cnn"',
            "fraction = 0.4": "fraction = 0.5",
            '["mobilenet_v3_small", "mobilenet_v3_large"]': '["tiny_cnn", "small_cnn"]',
            "fractions = [0.5, 1.0]": "fractions = [0.5]",
        },
    )
    summary = pilot(data=str(tiny_line), config_path=str(config))
    sweep = summary["sweep"]
    assert sweep["chosen"]["key"] == "tiny_cnn@0.5", sweep["trials"]
    reused = MlflowClient().get_run(sweep["chosen"]["run_id"])
    assert reused.data.tags["kensa.reused_from"] == summary["pilot_run_id"]
    assert sweep["chosen"]["training_cost"] == summary["pilot_cost"]
    candidate = MlflowClient().get_model_version_by_alias("qc-test", ALIAS_CANDIDATE)
    assert candidate.tags["kensa.onnx_sha256"]
    with open_store(env)() as session:
        stages = sorted(c.stage for c in session.scalars(select(CostEntry)))
    assert stages == ["pilot", "sweep"]  # the pilot once, the other trial once: nothing twice


def test_a_model_learned_from_good_parts_goes_through_the_same_pilot_sweep_and_compare(
    tiny_line: Path, tmp_path: Path, env: Settings
) -> None:
    from kensa.flows.pilot import pilot
    from kensa.models.data.ingest import load_dataset
    from kensa.models.evaluation.compare_onnx import ComparedModel, compare_models

    # PatchCore pilots on half the good parts; the sweep puts it beside a supervised model, both
    # judged by the same gate on the same parts and the same corrupted copies.
    config = write_config(
        tmp_path,
        LENIENT,
        **{
            'model = "small_cnn"': 'model = "patchcore"',
            "fraction = 0.4": "fraction = 0.5",
            '["mobilenet_v3_small", "mobilenet_v3_large"]': '["tiny_cnn", "patchcore"]',
            "fractions = [0.5, 1.0]": "fractions = [0.5]",
        },
    )
    summary = pilot(data=str(tiny_line), config_path=str(config))
    assert summary["gate"]["passed"]
    pilot_run = MlflowClient().get_run(summary["pilot_run_id"])
    for key in ("test.escape_rate", "test.defect_auroc", "robustness.corrupted_escape_rate"):
        assert key in pilot_run.data.metrics, sorted(pilot_run.data.metrics)
    assert pilot_run.data.params["epochs_run"] == "0"
    sweep = summary["sweep"]
    trials = {t["key"]: t for t in sweep["trials"]}
    assert set(trials) == {"tiny_cnn@0.5", "patchcore@0.5"}
    # The pilot's PatchCore is the sweep's patchcore point: taken over, not fitted again.
    reused = MlflowClient().get_run(trials["patchcore@0.5"]["run_id"])
    assert reused.data.tags["kensa.reused_from"] == summary["pilot_run_id"]
    for t in trials.values():
        assert 0.0 <= t["corrupted_escape_rate"] <= 1.0 and t["serving_cost_per_million"] > 0
    # A memory bank is not a model size: PatchCore stays off the error-vs-parameters curve.
    assert sweep["fits"]["error_vs_parameters"]["clean"]["n_points"] == 1
    assert set(sweep["fits"]["error_vs_data"]) == {"tiny_cnn", "patchcore"}
    assert MlflowClient().get_model_version_by_alias("qc-test", ALIAS_CANDIDATE).version

    # `kensa compare`'s engine: the supervised model and PatchCore on the same test parts.
    root = Path(summary["pilot_dir"]).parent
    onnx = {
        "tiny_cnn@0.5": root / "sweep" / "tiny_cnn_f0.5" / "model.onnx",
        "patchcore@0.5": root / "pilot" / "model.onnx",  # the pilot's, taken over by the sweep
    }
    ds = load_dataset(tiny_line)
    c = compare_models(
        ComparedModel("supervised", onnx["tiny_cnn@0.5"]),
        ComparedModel("patchcore", onnx["patchcore@0.5"]),
        ds,
        latency=lambda path, size: 1.0,
        cost_per_million=lambda ms: ms,
        max_robustness_images=16,
        show_progress=False,
    )
    a, b = c.rows
    assert (a.model_name, b.model_name) == ("tiny_cnn", "patchcore")
    n_defective = sum(r.label != "ok" for r in ds.split("test"))
    for row in (a, b):
        assert row.escape_rate * n_defective == pytest.approx(round(row.escape_rate * n_defective))
        assert 0.0 <= row.corrupted_escape_rate <= 1.0

    # Recalibrated without a refit: a new governed version of the same PatchCore graph. Asked for
    # a false-reject guarantee its good calibration parts cannot carry, it is refused with the count.
    from kensa.flows.register import register_candidate
    from kensa.models.evaluation.anomaly_band import NotEnoughCalibrationError
    from kensa.notebook.recalibrate import recalibrate_version

    with mlflow.start_run(experiment_id=MlflowClient().get_experiment_by_name("kensa").experiment_id):
        pc = register_candidate(
            onnx["patchcore@0.5"],
            "qc-test",
            registered_by="dana",
            source="test",
            kpi={},
            cost={},
            parity={},
            settings=env,
        )
    strict = tmp_path / "strict.toml"
    strict.write_text(
        config.read_text().replace("max_false_reject_rate = 0.99", "max_false_reject_rate = 0.001")
    )
    with pytest.raises(NotEnoughCalibrationError, match="at least 2302 are needed"):
        recalibrate_version(
            pc.version, registered_by="kim", reason="r", data=tiny_line, config=strict, settings=env
        )
    done = recalibrate_version(
        pc.version, registered_by="kim", reason="new lamp", data=tiny_line, config=config, settings=env
    )
    assert done.from_version == pc.version and int(done.version) == int(pc.version) + 1
    assert (
        MlflowClient().get_model_version("qc-test", done.version).tags["kensa.recalibrated_from"]
        == pc.version
    )
    # The audit bundle of the recalibrated anomaly model checks out offline, as a classifier's does.
    from kensa.governance.audit_export import export_bundle
    from kensa.governance.verify import verify_bundle

    bundle = export_bundle(
        env, "qc-test", done.version, tmp_path / "pc.tar.gz", exported_by="ann", data=tiny_line
    )
    _, checks = verify_bundle(bundle.path, None)
    assert [c.name for c in checks if c.passed is False] == [], checks


def test_budget_overrun_is_refused_before_anything_starts(
    tiny_line: Path, tmp_path: Path, env: Settings
) -> None:
    r = CliRunner().invoke(
        app,
        [
            "pilot",
            "--data",
            str(tiny_line),
            "--config",
            str(write_config(tmp_path, LENIENT + "budget = 0.0\n")),
        ],
    )
    # budget = 0 appended under [sweep]: the pilot passes, the sweep is refused before any trial.
    assert r.exit_code == 2, r.output
    assert "exceeds the budget" in r.output and "nothing was started" in r.output
    assert _runs("sweep") == [] and len(_runs("pilot")) == 1
    assert all(not r.info.run_name.startswith("mobilenet") for r in _runs())


def test_pilot_to_candidate_then_approval_reject_rollback(
    tiny_line: Path, tmp_path: Path, env: Settings
) -> None:
    from kensa.flows.pilot import pilot

    config = write_config(tmp_path, LENIENT)
    summary = pilot(data=str(tiny_line), config_path=str(config), registered_by="dana")
    sweep = summary["sweep"]
    trials = sweep["trials"]
    assert len(trials) == 4 and all(t["run_id"] for t in trials)
    eligible = [t for t in trials if t["meets_kpi"]]
    assert sweep["chosen"]["tco"] == min(t["tco"] for t in eligible)
    for png in (sweep["scaling_plot"], sweep["frontier_plot"]):
        assert Path(png).stat().st_size > 5000
    # Each trial is a nested run with clean and corrupted metrics, cost and latency.
    sweep_run = MlflowClient().get_run(sweep["sweep_run_id"])
    assert sweep_run.data.tags["mlflow.parentRunId"] == summary["pilot_run_id"]
    child = MlflowClient().get_run(trials[0]["run_id"])
    for key in (
        "test.escape_rate",
        "robustness.corrupted_error",
        "cost.amount",
        "cost.serving_per_million",
        "latency_ms_per_image",
    ):
        assert key in child.data.metrics
    client = MlflowClient()
    v1 = client.get_model_version_by_alias("qc-test", ALIAS_CANDIDATE)
    first = str(v1.version)
    assert v1.tags[TAG_REGISTERED_BY] == "dana"
    for tag in (
        "kensa.dataset_version",
        "kensa.thresholds",
        "kensa.kpi",
        "kensa.cost",
        "kensa.parity",
        "kensa.code_version",
        "kensa.onnx_sha256",
    ):
        assert v1.tags[tag]
    model = mlflow.pyfunc.load_model(f"models:/qc-test@{ALIAS_CANDIDATE}")
    import numpy as np

    out = model.predict({"images": np.zeros((2, 64, 64, 3), np.uint8)})
    assert out["probs"].shape[0] == 2
    # The ledger carries every stage and knows the version it paid for.
    r = CliRunner().invoke(app, ["cost", "--version", first])
    assert r.exit_code == 0 and "pilot" in r.output and "sweep" in r.output

    runner = CliRunner()
    cfg = ["--config", str(config)]
    # Two-person rule: the registrant cannot approve her own model.
    r = runner.invoke(app, ["approve", first, "--by", "dana", "--reason", "mine", *cfg])
    assert r.exit_code == 2 and "two-person" in r.output
    # A role outside the approval policy is refused.
    r = runner.invoke(app, ["approve", first, "--by", "lee", "--role", "line", "--reason", "x", *cfg])
    assert r.exit_code == 2 and "may not approve" in r.output
    r = runner.invoke(
        app,
        [
            "approve",
            first,
            "--by",
            "omar",
            "--role",
            "operator",
            "--reason",
            "pilot KPIs met",
            *cfg,
        ],
    )
    assert r.exit_code == 0, r.output
    assert str(client.get_model_version_by_alias("qc-test", ALIAS_CHAMPION).version) == first

    # A second candidate (same model file, re-registered) to approve, then roll back.
    from kensa.flows.register import register_candidate

    onnx_file = Path(summary["pilot_dir"]) / "model.onnx"
    with mlflow.start_run(experiment_id=client.get_experiment_by_name("kensa").experiment_id):
        v2 = register_candidate(
            onnx_file,
            "qc-test",
            registered_by="dana",
            source="test",
            kpi={},
            cost={},
            parity={},
            settings=env,
        )
        v3 = register_candidate(
            onnx_file,
            "qc-test",
            registered_by="dana",
            source="test",
            kpi={},
            cost={},
            parity={},
            settings=env,
        )
    assert (
        runner.invoke(app, ["approve", v2.version, "--by", "omar", "--reason", "better", *cfg]).exit_code == 0
    )
    r = runner.invoke(app, ["reject", v3.version, "--by", "omar", "--reason", "worse", *cfg])
    assert r.exit_code == 0
    assert client.get_model_version("qc-test", v3.version).tags[TAG_STATUS] == "rejected"
    r = runner.invoke(app, ["approve", v3.version, "--by", "omar", "--reason", "try", *cfg])
    assert r.exit_code == 2 and "rejected" in r.output
    r = runner.invoke(app, ["rollback", "--by", "omar", "--reason", "line complaints", *cfg])
    assert r.exit_code == 0, r.output
    assert str(client.get_model_version_by_alias("qc-test", ALIAS_CHAMPION).version) == first

    with open_store(env)() as session:
        events = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
        assert verify_chain(session) == []
    actions = [(e.action, e.actor, e.subject.rsplit("/", 1)[-1]) for e in events]
    assert ("model.approve", "omar", first) in actions
    assert ("model.reject", "omar", v3.version) in actions
    assert ("model.rollback", "omar", first) in actions
    assert not any(a == "model.approve" and who == "dana" for a, who, _ in actions)


def test_ddp_with_two_processes_on_cpu(tiny_line: Path, tmp_path: Path) -> None:
    """torchrun + gloo, two ranks: rank 0 alone writes, quality matches one process."""
    from kensa.flows.distributed import torchrun_command
    from kensa.models.train.trainer import TrainConfig, train

    cfg = TrainConfig(model="mobilenet_v3_small", epochs=2, seed=0, fraction=1.0)
    out = tmp_path / "ddp"
    proc = subprocess.run(
        torchrun_command(tiny_line, cfg, out, 2),
        capture_output=True,
        text=True,
        check=False,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("checkpoint:") == 1  # one report, from rank 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "train.json"]
    ddp = json.loads((out / "train.json").read_text())
    single = train(tiny_line, cfg, tmp_path / "single", show_progress=False)
    assert abs(ddp["validation_accuracy"] - single.validation_accuracy) <= 0.15
    assert ddp["train_images"] == single.train_images
    assert sys.executable  # the same interpreter ran both
