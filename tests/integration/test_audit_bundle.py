"""Audit bundles of a really trained, registered and approved version: export, verify, and tampering.

One tiny model goes through the code path the sweep uses (train → evaluate with corruptions →
export with parity → MLflow run with its evidence → registry → approval) on a real MLflow
(SQLite file) and store; the bundle of that version is then checked as a third party would, and
tampered with in the ways an auditor must catch.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from kensa.cli.common import get_settings
from kensa.cli.main import app
from kensa.governance import bundle as b

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = "qc-audit"


@dataclass(frozen=True)
class Exported:
    bundle: Path
    version: str
    sha256: str


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_line: Path) -> Iterator[Exported]:
    """A version registered the way the sweep does it, approved by a second person, exported."""
    import mlflow

    from kensa.flows.common import EXPERIMENT, log_outcome
    from kensa.flows.register import register_candidate
    from kensa.flows.stages import run_stage
    from kensa.flows.tracking import configure_mlflow, ensure_experiment, log_dataset_input
    from kensa.governance.approvals import Approval, approve
    from kensa.models.data.ingest import load_dataset
    from kensa.models.evaluation.evaluate_run import BandPolicy
    from kensa.models.train.trainer import TrainConfig
    from kensa.settings import Settings

    tmp = tmp_path_factory.mktemp("audit")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KENSA_DATA_DIR", str(tmp / "kensa"))
        get_settings.cache_clear()
        settings = Settings()
        client = configure_mlflow(settings)
        experiment = ensure_experiment(settings, EXPERIMENT)
        # A lenient band (α = 50 %) so one epoch on the tiny line still certifies it.
        outcome = run_stage(
            tiny_line,
            tmp / "trial",
            TrainConfig(model="small_cnn", epochs=1, seed=0),
            BandPolicy(alpha=0.5, delta=0.1, max_false_reject=0.5),
            None,
            8,
            16,
            show_progress=False,
        )
        ds = load_dataset(tiny_line)
        with mlflow.start_run(experiment_id=experiment, run_name="sweep") as run:
            log_dataset_input(tiny_line, ds.version, name=f"line-{ds.short_version}")
            trial = client.create_run(
                experiment, run_name="small_cnn@1", tags={"mlflow.parentRunId": run.info.run_id}
            )
            log_outcome(client, trial.info.run_id, outcome)
            client.set_terminated(trial.info.run_id)
            mlflow.set_tag("kensa.sweep.chosen_run", trial.info.run_id)
            registered = register_candidate(
                outcome.onnx_path,
                NAME,
                registered_by="dana",
                source="sweep",
                kpi={"passed": True, "trial": "small_cnn@1", "escape_rate": outcome.metrics["escape_rate"]},
                cost={"training": 0.004, "serving_per_million": 0.21, "tco": 3.9, "currency": "EUR"},
                parity=outcome.parity,
                settings=settings,
            )
        approve(
            NAME,
            registered.version,
            by="omar",
            role="operator",
            reason="pilot KPIs met",
            policy=Approval(),
            settings=settings,
        )
        out = tmp / "bundle.tar.gz"
        code, output = _cli(
            "audit", "export", registered.version, "--name", NAME, "--out", str(out), "--by", "ann-auditor"
        )
        assert code == 0, output
        yield Exported(out, registered.version, registered.sha256)
    get_settings.cache_clear()


def _unpacked(bundle: Path, dest: Path) -> Path:
    with tarfile.open(bundle, "r:gz") as tar:
        tar.extractall(dest, filter="data")
    (root,) = list(dest.iterdir())
    return root


def _tampered(exported: Exported, tmp: Path, change: Callable[[Path], None], *, reseal: bool) -> Path:
    """A copy of the bundle changed by ``change``; ``reseal`` rewrites MANIFEST.sha256 to match."""
    root = _unpacked(exported.bundle, tmp / "x")
    change(root)
    if reseal:
        b.write_manifest(root)
    out = tmp / "tampered.tar.gz"
    b.pack(root, out, 0)
    return out


def _rows(output: str) -> dict[str, str]:
    """check name -> 'pass' | 'FAIL' | 'skip' from the verify table."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line) if c.strip()]
        if len(cells) >= 2 and cells[1] in ("pass", "FAIL", "skip"):
            rows[cells[0]] = cells[1]
    return rows


def test_fresh_bundle_verifies_offline_and_against_the_live_store(exported: Exported, tmp_path: Path) -> None:
    code, output = _cli("audit", "verify", str(exported.bundle))
    assert code == 0, output
    rows = _rows(output)
    assert set(rows.values()) == {"pass"}, output
    assert {
        "files (MANIFEST.sha256)",
        "audit chain",
        "approvals",
        "ONNX sha256",
        "parity (ONNX Runtime)",
        "dataset version",
        "metrics vs registration",
        "model card",
    } <= set(rows)
    code, output = _cli("audit", "verify", str(exported.bundle), "--live")
    assert code == 0, output
    assert _rows(output)["live audit trail"] == "pass" and _rows(output)["live registry"] == "pass"

    root = _unpacked(exported.bundle, tmp_path)
    # Every file is in the manifest with its real hash (what `sha256sum -c MANIFEST.sha256` checks).
    listed = b.parse_manifest((root / b.MANIFEST).read_text())
    assert set(listed) == set(b.bundle_files(root))
    assert all(hashlib.sha256((root / p).read_bytes()).hexdigest() == h for p, h in listed.items())
    assert hashlib.sha256((root / b.ONNX).read_bytes()).hexdigest() == exported.sha256
    # The card covers what an auditor asks for, with the figures from the evidence files.
    card = (root / b.CARD_MD).read_text()
    metrics = json.loads((root / b.METRICS).read_text())
    for heading in (
        "## Intended use",
        "## Data",
        "## Metrics",
        "### Slice: camera",
        "## Robustness",
        "## Thresholds and their guarantee",
        "## Cost",
        "## Limitations",
    ):
        assert heading in card
    assert f"{metrics['escape_rate']:.2%}" in card and "3.90 EUR" in card
    assert "| omar | operator | model.approve |" in card
    html = (root / b.CARD_HTML).read_text()
    assert "<table>" in html and 'src="evaluation/plots/confusion_matrix.png"' in html
    assert (root / "evaluation/plots/robustness_error.png").stat().st_size > 1000
    # Approvals and the events that carry them; the bundle's own hash recipe recomputes each one.
    approvals = json.loads((root / b.APPROVALS).read_text())
    assert [(a["action"], a["actor"], a["role"]) for a in approvals] == [
        ("model.approve", "omar", "operator")
    ]
    events = [json.loads(line) for line in (root / b.EVENTS).read_text().splitlines()]
    assert [e["action"] for e in events] == ["model.register", "model.approve"]
    recipe = re.search(r"```python\n(.*?)```", (root / b.README).read_text(), re.S)
    assert recipe is not None
    namespace: dict[str, object] = {}
    exec(recipe.group(1), namespace)  # noqa: S102 - the documented recipe, run as a reader would
    event_hash = namespace["event_hash"]
    assert callable(event_hash)
    assert all(event_hash(e) == e["hash"] for e in events)
    # The dataset manifest rides along and hashes to the registered dataset version.
    mv = json.loads((root / b.MODEL_VERSION).read_text())
    assert json.loads((root / b.DATASET).read_text())["version"] == mv["tags"]["kensa.dataset_version"]


def test_changed_metric_is_caught(exported: Exported, tmp_path: Path) -> None:
    def better_escape_rate(root: Path) -> None:
        path = root / b.METRICS
        metrics = json.loads(path.read_text())
        metrics["escape_rate"] = 0.001
        path.write_text(json.dumps(metrics))

    tampered = _tampered(exported, tmp_path, better_escape_rate, reseal=False)
    code, output = _cli("audit", "verify", str(tampered))
    assert code == 3 and _rows(output)["files (MANIFEST.sha256)"] == "FAIL"
    assert "changed: evaluation/metrics.json" in output
    # Re-sealing the manifest does not help: the figure no longer matches the audited registration.
    (tmp_path / "x").rename(tmp_path / "first")
    resealed = _tampered(exported, tmp_path, better_escape_rate, reseal=True)
    code, output = _cli("audit", "verify", str(resealed))
    rows = _rows(output)
    assert code == 3 and rows["files (MANIFEST.sha256)"] == "pass"
    assert rows["metrics vs registration"] == "FAIL" and rows["model card"] == "FAIL"
    assert "escape_rate = 0.001" in output


def test_swapped_onnx_is_caught(exported: Exported, tmp_path: Path) -> None:
    def swap_model(root: Path) -> None:
        # Another model under the same metadata: the head's bias moved towards "ok".
        model = onnx.load(str(root / b.ONNX))
        n_classes = len(json.loads((root / b.ONNX_METADATA).read_text())["classes"])
        bias = next(t for t in model.graph.initializer if list(t.dims) == [n_classes])
        values = numpy_helper.to_array(bias).copy()
        values[0] += 4.0
        bias.CopyFrom(numpy_helper.from_array(values.astype(np.float32), bias.name))
        onnx.save(model, str(root / b.ONNX))

    code, output = _cli("audit", "verify", str(_tampered(exported, tmp_path, swap_model, reseal=True)))
    rows = _rows(output)
    assert code == 3
    assert rows["ONNX sha256"] == "FAIL" and rows["parity (ONNX Runtime)"] == "FAIL"
    assert "registry tag kensa.onnx_sha256" in output and "max |Δp|" in output


def test_removed_approval_is_caught(exported: Exported, tmp_path: Path) -> None:
    def drop_approval(root: Path) -> None:
        path = root / b.EVENTS
        kept = [line for line in path.read_text().splitlines() if '"model.approve"' not in line]
        path.write_text("".join(line + "\n" for line in kept))

    code, output = _cli("audit", "verify", str(_tampered(exported, tmp_path, drop_approval, reseal=True)))
    rows = _rows(output)
    assert code == 3 and rows["approvals"] == "FAIL" and rows["audit chain"] == "FAIL"
    assert "no model.approve event" in output and "missing from audit/events.jsonl" in output


def test_garbage_in_the_event_log_fails_the_checks_without_a_traceback(
    exported: Exported, tmp_path: Path
) -> None:
    def garble(root: Path) -> None:
        with (root / b.EVENTS).open("a") as f:
            f.write("{not json\n")
        (root / b.CHAIN).write_text("[1, 2, 3]")

    code, output = _cli("audit", "verify", str(_tampered(exported, tmp_path, garble, reseal=False)))
    rows = _rows(output)
    assert code == 3 and "Traceback" not in output
    assert rows["audit chain"] == "FAIL" and rows["files (MANIFEST.sha256)"] == "FAIL"
    assert "is not JSON" in output


def test_a_consistently_forged_bundle_passes_offline_but_not_against_the_store(
    exported: Exported, tmp_path: Path
) -> None:
    """Remove the approval everywhere in the bundle: only the live trail can tell."""

    def forge(root: Path) -> None:
        path = root / b.EVENTS
        events = [json.loads(x) for x in path.read_text().splitlines()]
        kept = [e for e in events if e["action"] != "model.approve"]
        path.write_text("".join(json.dumps(e) + "\n" for e in kept))
        chain = json.loads((root / b.CHAIN).read_text())
        chain["included"] = [e["id"] for e in kept]
        chain["links"] = [link for link in chain["links"] if link[0] <= kept[-1]["id"]]
        (root / b.CHAIN).write_text(json.dumps(chain))
        (root / b.APPROVALS).write_text(json.dumps(b.decisions(kept, exported.version)))
        mv = json.loads((root / b.MODEL_VERSION).read_text())
        mv["tags"]["kensa.status"], mv["aliases"] = "candidate", []
        (root / b.MODEL_VERSION).write_text(json.dumps(mv))
        from kensa.governance.modelcard import render_html, render_markdown

        evidence = b.card_evidence(b.read_view(root))
        (root / b.CARD_MD).write_text(render_markdown(evidence))
        (root / b.CARD_HTML).write_text(render_html(evidence))

    forged = _tampered(exported, tmp_path, forge, reseal=True)
    code, output = _cli("audit", "verify", str(forged))
    assert code == 0, output
    code, output = _cli("audit", "verify", str(forged), "--live")
    assert code == 3 and _rows(output)["live audit trail"] == "FAIL"
    assert "leaves out" in output and "(model.approve)" in output


def test_malformed_files_exit_2(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not an archive at all")
    code, output = _cli("audit", "verify", str(junk))
    assert code == 2 and "not a .tar.gz archive" in output
    other = tmp_path / "other.tar.gz"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hello")
    with tarfile.open(other, "w:gz") as tar:
        tar.add(tmp_path / "other", arcname="other")
    code, output = _cli("audit", "verify", str(other))
    assert code == 2 and "not a kensa audit bundle" in output
    code, output = _cli("audit", "verify", str(tmp_path / "missing.tar.gz"))
    assert code == 2 and "does not exist" in output


def test_export_refuses_bad_requests(exported: Exported, tmp_path: Path) -> None:
    code, output = _cli("audit", "export", "999", "--name", NAME, "--out", str(tmp_path / "b.tar.gz"))
    assert code == 2 and "version 999 is not in the registry" in output
    code, output = _cli("audit", "export", exported.version, "--name", NAME, "--out", str(tmp_path / "b.zip"))
    assert code == 2 and ".tar.gz" in output


def test_auditor_can_read_but_not_approve(exported: Exported) -> None:
    from mlflow.tracking import MlflowClient
    from sqlalchemy import func, select

    from kensa.store.connect import open_store
    from kensa.store.models import AuditEvent

    settings = get_settings()
    with open_store(settings)() as session:
        before = session.scalar(select(func.count()).select_from(AuditEvent))
    code, output = _cli(
        "approve",
        exported.version,
        "--name",
        NAME,
        "--by",
        "ann",
        "--role",
        "auditor",
        "--reason",
        "looks fine",
    )
    assert code == 2 and "role 'auditor' may not approve models" in output
    code, output = _cli("rollback", "--name", NAME, "--by", "ann", "--role", "auditor", "--reason", "x")
    assert code == 2 and "may not roll back" in output
    with open_store(settings)() as session:
        assert session.scalar(select(func.count()).select_from(AuditEvent)) == before
    assert str(MlflowClient().get_model_version_by_alias(NAME, "champion").version) == exported.version
