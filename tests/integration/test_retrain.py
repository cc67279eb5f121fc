"""Retraining on the embedded default: review labels → new dataset version → candidate, never champion.

Real parts throughout: the SQLite store holds the review queue, MLflow (SQLite) the registry and
runs, Prefect's ephemeral API the flow run; the champion is a model trained on the tiny line.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from config_helpers import LENIENT_KPI
from mlflow.tracking import MlflowClient
from retrain_helpers import queue_reviews, register_champion
from sqlalchemy import select

from kensa.cli.common import get_settings
from kensa.models.data.ingest import load_dataset
from kensa.models.line.stream import StreamPart, StreamPlan, iter_stream
from kensa.registry import ALIAS_CANDIDATE, ALIAS_CHAMPION, TAG_SOURCE, TAG_STATUS
from kensa.settings import Settings
from kensa.store.connect import open_store
from kensa.store.models import Alert, AuditEvent

pytestmark = [pytest.mark.integration]

CONFIG = f"""
name = "qc-retrain"
{LENIENT_KPI}[sweep]
max_robustness_images = 16
"""


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """A fresh data dir and project config, as a user's environment would set them."""
    config = tmp_path / "kensa.toml"
    config.write_text(CONFIG)
    monkeypatch.setenv("KENSA_DATA_DIR", str(tmp_path / "kensa"))
    monkeypatch.setenv("KENSA_PROJECT_CONFIG", str(config))
    get_settings.cache_clear()
    return Settings()


def _review_parts(n: int, seed: int = 41) -> list[StreamPart]:
    # Parts the line sent later (another stream seed), at the dataset's 64 px.
    return list(iter_stream(StreamPlan(n=n, seed=seed, image_size=64)))


def test_review_labels_make_a_new_dataset_version_that_contains_them(tiny_line: Path, env: Settings) -> None:
    from kensa.flows.retrain_inputs import labelled_reviews
    from kensa.models.data.reviewed import merge_reviewed

    base = load_dataset(tiny_line)
    parts = _review_parts(24)
    labelled = queue_reviews(env, parts[:20], [p.label for p in parts[:20]])
    queue_reviews(env, parts[20:22], ["unsure", "unsure"])  # a person could not tell
    queue_reviews(env, parts[22:24], [None, None])  # still open: nobody looked yet
    # An image that is already training data, labelled again: nothing new to learn from it.
    known = base.split("train")[0]
    again_seen = replace(parts[0], png=known.absolute_path.read_bytes(), part_id="L1-again")
    queue_reviews(env, [again_seen], [known.label])
    images, skipped = labelled_reviews(env)
    assert len(images) == 21 and skipped == {"unsure": 2}

    merged = merge_reviewed(base, images, env.data_dir / "datasets", env)
    assert merged.skipped == {"already_in_base": 1}
    ds = merged.dataset
    assert ds.version != base.version and len(ds.records) == len(base.records) + 20
    by_sha = {r.sha256: r for r in ds.records}
    for q in labelled:  # every labelled review image is in, with the person's label
        assert by_sha[q.sha256].label == q.label
        assert by_sha[q.sha256].metadata["origin"] == "review"
    # The champion's test set is still the yardstick: same images, same labels, same split.
    old_test = {(r.sha256, r.label) for r in base.split("test")}
    assert {(r.sha256, r.label) for r in ds.split("test") if r.metadata["origin"] == "base"} == old_test
    assert {r.split for r in merged.added} == {"train", "calibration", "test"}
    # Reviewed parts are grouped by part id like any data: one part, one split.
    assert len({r.part_id for r in merged.added}) == 20
    # The same inputs give the same version in the same folder; the base folder is untouched.
    again = merge_reviewed(base, images, env.data_dir / "datasets", env)
    assert again.dataset.version == ds.version and again.dataset.root == ds.root
    assert load_dataset(tiny_line, verify=True).version == base.version


@pytest.fixture(scope="module")
def prefect_api(prefect_harness: None) -> None:
    """The session's Prefect API (see tests/conftest.py)."""


@pytest.mark.slow
def test_retraining_registers_a_compared_candidate_and_leaves_the_champion(
    tiny_line: Path, trained_run: Path, env: Settings, tmp_path: Path, prefect_api: None
) -> None:
    from prefect.client.orchestration import get_client

    from kensa.flows.retrain import TAG_COMPARISON, start_retraining
    from kensa.models.onnx.export import export_run

    onnx_path = export_run(trained_run, tmp_path / "champion.onnx").path
    champion = register_champion(env, onnx_path, tiny_line, "qc-retrain")
    parts = _review_parts(30)
    queue_reviews(env, parts, [p.label for p in parts], model=("qc-retrain", champion))
    with open_store(env)() as session:
        alert = Alert(level="critical", kind="drift", cause="lighting dropped", line_id="L1")
        session.add(alert)
        session.commit()
        alert_id = alert.id

    flow_run_id = start_retraining(env, alert_id=alert_id, reason="critical drift on L1")

    with get_client(sync_client=True) as prefect:
        run = prefect.read_flow_run(flow_run_id)
    assert run.state is not None and run.state.is_completed(), run.state
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("qc-retrain", ALIAS_CHAMPION).version) == champion
    candidate = client.get_model_version_by_alias("qc-retrain", ALIAS_CANDIDATE)
    assert candidate.version != champion
    tags = candidate.tags
    assert tags[TAG_SOURCE] == "retrain" and tags[TAG_STATUS] == "candidate"
    assert tags["kensa.retrain.alert_id"] == str(alert_id)
    assert tags["kensa.retrain.champion_version"] == champion
    assert tags["kensa.retrain.new_labels"] == "30"
    comparison = json.loads(tags[TAG_COMPARISON])
    assert comparison["old_test"]["n"] == len(load_dataset(tiny_line).split("test"))
    assert 0 < comparison["reviewed"]["n"] < 30  # the held-out share of the reviewed parts
    for entry in comparison.values():
        assert set(entry) == {"n", "champion", "candidate"}
        assert 0 <= entry["candidate"]["escape_rate"] <= 1

    # The new dataset version holds the reviewed parts; the candidate was trained on it.
    new_ds = load_dataset(Path(_input_path(client, candidate.run_id)))
    assert tags["kensa.dataset_version"] == new_ds.version
    assert sum(r.metadata.get("origin") == "review" for r in new_ds.records) == 30
    mlrun = client.get_run(candidate.run_id)
    assert mlrun.data.tags["kensa.stage"] == "retrain"
    assert "compare.reviewed.candidate.escape_rate" in mlrun.data.metrics
    assert "compare.old_test.champion.accuracy" in mlrun.data.metrics
    artifacts = {a.path for a in client.list_artifacts(candidate.run_id)}
    assert {"comparison.json", "comparison.md", "plots", "onnx"} <= artifacts
    with open_store(env)() as session:
        events = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
    register = [e for e in events if e.action == "model.register"]
    assert register[-1].details["source"] == "retrain"
    assert not any(
        e.action == "model.approve" and e.subject.endswith(f"/{candidate.version}") for e in events
    )


def _input_path(client: MlflowClient, run_id: str) -> str:
    from kensa.flows.retrain_inputs import _local_path

    for di in client.get_run(run_id).inputs.dataset_inputs:
        if {t.key: t.value for t in di.tags}.get("mlflow.data.context") == "training":
            path = _local_path(di.dataset.source)
            assert path is not None
            return str(path)
    raise AssertionError("no training dataset input")


def test_kensa_retrain_without_a_champion_fails_saying_what_to_do(env: Settings, prefect_api: None) -> None:
    from typer.testing import CliRunner

    from kensa.cli.main import app

    result = CliRunner().invoke(app, ["retrain", "--reason", "operator asked"])
    assert result.exit_code == 1, result.output
    out = " ".join(result.output.split())
    assert "retraining failed" in out and "qc-retrain has no champion to retrain from" in out
    assert "kensa approve VERSION" in out
    assert MlflowClient().search_registered_models() == []
