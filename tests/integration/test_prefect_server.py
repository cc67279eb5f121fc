"""Deployments on a real Prefect server: prefect.yaml, `kensa deploy`, a process worker, approval.

One `prefect server start` (SQLite in tmp) serves the module. `kensa deploy` creates the pools
through Prefect's client and the deployments with `prefect deploy --all`; a `prefect worker
start --type process` on `onprem-gpu` runs the `pilot` deployment on the tiny line. That one run
covers the whole path — worker → pilot → sweep → candidate → pause for approval → a person
answers through the API → champion — because a second full run would double the file's time on
a 2-core machine.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient
from servers import (
    MODEL_NAME,
    PREFECT_YAML,
    REPO,
    Running,
    clean_env,
    free_port,
    prefect_server,
    prefect_worker,
    write_config,
)
from sqlalchemy import select

from kensa.flows.deploy import DeployConfigError, load_prefect_yaml
from kensa.registry import ALIAS_CANDIDATE, ALIAS_CHAMPION, TAG_REGISTERED_BY, TAG_STATUS
from kensa.settings import Settings
from kensa.store.audit import verify_chain
from kensa.store.connect import open_store
from kensa.store.models import AuditEvent

RUN_TIMEOUT_S = 480  # pilot → sweep on a shared 2-core CPU, with headroom


# --- prefect.yaml: kensa's rules, checked without a server -------------------------------------


def test_prefect_yaml_declares_the_pools_and_deployments() -> None:
    plan = load_prefect_yaml(PREFECT_YAML)
    assert {p.name: p.type for p in plan.pools} == {"onprem-gpu": "process", "cloud-gpu": "kubernetes"}
    assert {p.name: p.gpus for p in plan.pools}["cloud-gpu"] == 1
    assert {d.name: d.entrypoint for d in plan.deployments} == {
        "pilot": "flows/pilot.py:pilot",
        "sweep": "flows/sweep.py:sweep",
        "retrain": "flows/retrain.py:retrain",
        "drift-check": "flows/drift_check.py:drift_check",
    }
    assert {d.work_pool for d in plan.deployments} == {"onprem-gpu"}
    # The rest is Prefect's own format, read by `prefect deploy`: the build step records the
    # checkout it runs in, the pull step starts every flow run there.
    raw = yaml.safe_load(PREFECT_YAML.read_text())
    (build,) = raw["build"]
    assert build["prefect.deployments.steps.run_shell_script"]["id"] == "checkout"
    assert raw["pull"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ checkout.stdout }}"}}
    ]
    by_name = {d["name"]: d for d in raw["deployments"]}
    assert by_name["pilot"]["parameters"]["wait_for_approval"] is True
    assert "data" not in by_name["pilot"]["parameters"]  # given per run
    # The drift check runs on a schedule; the training flows only when started.
    (schedule,) = by_name["drift-check"]["schedules"]
    assert schedule["interval"] == 900 and schedule["anchor_date"]
    assert all("schedules" not in by_name[n] for n in ("pilot", "sweep", "retrain"))


@pytest.mark.parametrize(
    ("mutation", "message"),
    [
        # YAML that does not parse.
        (lambda t: t + "  - name: [unclosed\n", "is not valid YAML"),
        # A deployment on a pool nobody creates.
        (
            lambda t: t.replace(
                "      name: onprem-gpu\n      work_queue_name",
                "      name: onprem-gpus\n      work_queue_name",
                1,
            ),
            "work_pool.name 'onprem-gpus' is not declared under definitions.pools",
        ),
        # No pools to create.
        (lambda t: t.replace("  pools:\n", "  pool_list:\n", 1), "definitions.pools must list"),
        (
            lambda t: t.replace("entrypoint: flows/sweep.py:sweep", "entrypoint: flows/sweep.py", 1),
            "needs a name and an entrypoint",
        ),
    ],
    ids=["yaml-syntax", "undeclared-pool", "no-pools", "entrypoint"],
)
def test_kensas_rules_refuse_a_broken_copy(tmp_path: Path, mutation: Any, message: str) -> None:
    broken = tmp_path / "infra" / "prefect.yaml"
    broken.parent.mkdir()
    text = PREFECT_YAML.read_text()
    changed = mutation(text)
    assert changed != text
    broken.write_text(changed)
    with pytest.raises(DeployConfigError) as err:
        load_prefect_yaml(broken)
    assert message in str(err.value)


# --- the server, `kensa deploy`, the worker -----------------------------------------------------


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """`prefect server start`; this test process's Prefect client points at it meanwhile."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        prefect_server(tmp_path_factory.mktemp("prefect-server")) as server,
        temporary_settings(updates={PREFECT_API_URL: server.url}),
    ):
        yield server


def _kensa_deploy(api_url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # `kensa deploy` once kensa/cli/main.py registers it; the module is the same command.
    cmd = [
        sys.executable,
        "-m",
        "kensa.cli.deploy",
        "--api-url",
        api_url,
        "--prefect-yaml",
        str(PREFECT_YAML),
    ]
    return subprocess.run(
        cmd,
        cwd=cwd,
        env=clean_env(KENSA_DATA_DIR=str(cwd / "data")),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.integration
def test_kensa_deploy_without_a_server_exits_2(tmp_path: Path) -> None:
    nobody = f"http://127.0.0.1:{free_port()}/api"
    result = _kensa_deploy(nobody, tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"no Prefect API answers at {nobody}" in result.stderr


@pytest.fixture(scope="module")
def deployed(
    prefect_api: Running,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """`kensa deploy` run twice against the server (the second run must change nothing)."""
    cwd = tmp_path_factory.mktemp("deploy")
    return _kensa_deploy(prefect_api.url, cwd), _kensa_deploy(prefect_api.url, cwd)


@dataclass
class WorkerSide:
    """The worker process and the kensa data dir its flow runs use."""

    worker: Running
    settings: Settings
    config: Path

    @property
    def mlflow(self) -> MlflowClient:
        uri = self.settings.resolved_mlflow_uri
        return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def worker(
    prefect_api: Running, deployed: Any, tiny_line: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerSide]:
    assert deployed[0].returncode == 0, deployed[0].stdout + deployed[0].stderr
    root = tmp_path_factory.mktemp("worker")
    data_dir = root / "kensa"
    # The flow runs build Settings from these: embedded MLflow and store in the worker's data dir.
    env = {"KENSA_DATA_DIR": str(data_dir)}
    with prefect_worker(prefect_api.url, "onprem-gpu", root / "prefect", env) as w:
        yield WorkerSide(w, Settings(data_dir=data_dir), write_config(root))


def _wait_for(flow_run_id: Any, wanted: str, worker: Running, timeout_s: float) -> Any:
    """Poll the flow run until its state type is ``wanted``; fail early on a final other state."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            state = run.state
            if state is not None and state.type.value == wanted:
                return run
            if state is not None and state.is_final():
                pytest.fail(
                    f"flow run ended {state.type.value} ({state.message}) instead of "
                    f"reaching {wanted}; worker log:\n{worker.log_tail(60)}"
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"flow run still {state.type.value if state else None} after "
                    f"{timeout_s:.0f} s; worker log:\n{worker.log_tail(60)}"
                )
            time.sleep(2)


@pytest.fixture(scope="module")
def paused_pilot(worker: WorkerSide, tiny_line: Path) -> Any:
    """The `pilot` deployment run by the worker, paused for approval after the sweep."""
    from prefect.deployments import run_deployment

    run = run_deployment(
        "pilot/pilot",
        timeout=0,  # return at once; the worker picks it up
        parameters={
            "data": str(tiny_line),
            "config_path": str(worker.config),
            "registered_by": "dana",
            "wait_for_approval": True,
        },
    )
    return _wait_for(run.id, "PAUSED", worker.worker, RUN_TIMEOUT_S)


@pytest.mark.integration
@pytest.mark.slow
def test_kensa_deploy_creates_pools_and_deployments_idempotently(
    prefect_api: Running,
    deployed: Any,
) -> None:
    from prefect.client.orchestration import get_client

    first, second = deployed
    assert first.returncode == 0, first.stdout + first.stderr
    for name in (
        "onprem-gpu",
        "cloud-gpu",
        "pilot/pilot",
        "sweep/sweep",
        "retrain/retrain",
        "drift-check/drift-check",
    ):
        assert any(name in line and "created" in line for line in first.stdout.splitlines()), first.stdout
    assert "skipped" not in first.stderr
    assert second.returncode == 0, second.stdout + second.stderr
    assert "created" not in second.stdout and "updated" not in second.stdout
    assert second.stdout.count("unchanged") == 6, second.stdout

    with get_client(sync_client=True) as client:
        onprem = client.read_work_pool("onprem-gpu")
        cloud = client.read_work_pool("cloud-gpu")
        deployments = {d.name: d for d in client.read_deployments()}
    assert onprem.type == "process" and "working_dir" in onprem.base_job_template["variables"]["properties"]
    # No prefect-kubernetes here: the pool still gets Kubernetes' template, asking for a GPU.
    assert cloud.type == "kubernetes"
    pod = cloud.base_job_template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_limit }}"
    assert cloud.base_job_template["variables"]["properties"]["gpu_limit"]["default"] == 1
    assert set(deployments) == {"pilot", "sweep", "retrain", "drift-check"}
    # The drift check is scheduled on the server, every 15 minutes.
    (schedule,) = deployments["drift-check"].schedules
    assert schedule.active and schedule.schedule.interval.total_seconds() == 900
    assert not deployments["pilot"].schedules
    pilot = deployments["pilot"]
    assert pilot.entrypoint == "flows/pilot.py:pilot" and pilot.work_pool_name == "onprem-gpu"
    # The worker on this host starts each run in this checkout.
    assert pilot.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    assert pilot.enforce_parameter_schema
    assert pilot.parameter_openapi_schema["required"] == ["data"]


_SCHEDULE = '      - interval: 900\n        anchor_date: "2025-01-01T00:00:00+00:00"\n        timezone: UTC\n'


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize(
    ("mutation", "message"),
    [
        # A field of the wrong type: Prefect's loader refuses the whole file, nothing is deployed.
        (
            lambda t: t.replace(
                "enforce_parameter_schema: true", "enforce_parameter_schema: [not, a, bool]", 1
            ),
            "pilot: enforce_parameter_schema",
        ),
        # A cron line that does not parse: Prefect stops at that deployment (the file's last).
        (lambda t: t.replace(_SCHEDULE, "      - cron: '*/15 * *'\n", 1), 'Invalid cron string: "*/15 * *"'),
    ],
    ids=["schema", "cron"],
)
def test_prefect_deploy_refuses_a_broken_copy(
    prefect_api: Running, deployed: Any, tmp_path: Path, mutation: Any, message: str
) -> None:
    from kensa.flows.deploy import deploy

    text = PREFECT_YAML.read_text()
    assert _SCHEDULE in text
    broken = tmp_path / "prefect.yaml"
    broken.write_text(mutation(text))
    with pytest.raises(DeployConfigError) as err:
        deploy(broken, prefect_api.url, repo_dir=REPO)
    assert "prefect deploy refused" in str(err.value) and message in str(err.value), str(err.value)


@pytest.mark.integration
@pytest.mark.slow
def test_a_changed_prefect_yaml_updates_only_what_changed(
    prefect_api: Running,
    deployed: Any,
    tmp_path: Path,
) -> None:
    from prefect.client.orchestration import get_client

    from kensa.flows.deploy import deploy

    changed = tmp_path / "prefect.yaml"
    changed.write_text(
        PREFECT_YAML.read_text()
        .replace("gpus: 1", "gpus: 2")
        .replace(
            "    parameters:\n      seed: 0\n      registered_by",
            "    parameters:\n      seed: 7\n      registered_by",
        )
    )
    try:
        actions = {a.name: a.action for a in deploy(changed, prefect_api.url, repo_dir=REPO)}
        assert actions == {
            "onprem-gpu": "unchanged",
            "cloud-gpu": "updated",
            "pilot/pilot": "unchanged",
            "sweep/sweep": "updated",
            "retrain/retrain": "unchanged",
            "drift-check/drift-check": "unchanged",
        }
        with get_client(sync_client=True) as client:
            cloud = client.read_work_pool("cloud-gpu")
            assert cloud.base_job_template["variables"]["properties"]["gpu_limit"]["default"] == 2
            assert client.read_deployment_by_name("sweep/sweep").parameters["seed"] == 7
    finally:
        # Back to the checked-in file for the other tests.
        deploy(PREFECT_YAML, prefect_api.url)


@pytest.mark.integration
@pytest.mark.slow
def test_retraining_is_started_through_its_deployment_when_the_server_has_it(
    prefect_api: Running,
    deployed: Any,
    tmp_path: Path,
) -> None:
    from prefect.client.orchestration import get_client

    from kensa.flows.retrain import start_retraining

    settings = Settings(data_dir=tmp_path / "kensa", prefect_api_url=prefect_api.url)
    flow_run_id = start_retraining(settings, alert_id=17, reason="critical drift on L1")
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        deployment = client.read_deployment_by_name("retrain/retrain")
        # Scheduled for a worker on the on-prem pool, not run here; then withdrawn, so the
        # worker the next tests start does not retrain a model that does not exist yet.
        client.delete_flow_run(run.id)
    assert run.deployment_id == deployment.id and run.work_pool_name == "onprem-gpu"
    assert run.state is not None and run.state.type.value == "SCHEDULED"
    assert run.parameters == {
        "alert_id": 17,
        "reason": "critical drift on L1",
        "registered_by": "prefect-retrain",
    }


@pytest.mark.integration
@pytest.mark.slow
def test_pilot_deployment_runs_on_the_worker_and_registers_a_candidate(
    worker: WorkerSide,
    paused_pilot: Any,
) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("pilot/pilot")
    assert paused_pilot.deployment_id == deployment.id
    assert paused_pilot.work_pool_name == "onprem-gpu"
    # This worker, not some other runner, started it.
    assert str(paused_pilot.id) in worker.worker.log.read_text(errors="replace")
    candidate = worker.mlflow.get_model_version_by_alias(MODEL_NAME, ALIAS_CANDIDATE)
    assert candidate.tags[TAG_REGISTERED_BY] == "dana"
    assert candidate.tags[TAG_STATUS] == "candidate"
    # Paused on the approval form for exactly this version.
    assert paused_pilot.state.state_details.pause_key == f"approve-{candidate.version}"


@pytest.mark.integration
@pytest.mark.slow
def test_approval_answered_through_the_api_makes_the_champion(
    worker: WorkerSide,
    paused_pilot: Any,
) -> None:
    from prefect.flow_runs import resume_flow_run

    version = worker.mlflow.get_model_version_by_alias(MODEL_NAME, ALIAS_CANDIDATE).version
    # What a person fills in on the paused run in the Prefect UI; not dana, who registered it.
    resume_flow_run(
        paused_pilot.id,
        run_input={"approve": True, "by": "erin", "role": "operator", "reason": "pilot and sweep look right"},
    )
    _wait_for(paused_pilot.id, "COMPLETED", worker.worker, 300)

    champion = worker.mlflow.get_model_version_by_alias(MODEL_NAME, ALIAS_CHAMPION)
    assert champion.version == version and champion.tags[TAG_STATUS] == "approved"
    assert ALIAS_CANDIDATE not in worker.mlflow.get_registered_model(MODEL_NAME).aliases
    with open_store(worker.settings)() as session:
        events = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
        assert verify_chain(session) == []
    subject = f"model:{MODEL_NAME}/{version}"
    trail = [(e.action, e.actor) for e in events if e.subject == subject]
    assert trail == [("model.register", "dana"), ("model.approve", "erin")]
    approval = next(e for e in events if e.action == "model.approve")
    assert approval.details["reason"] == "pilot and sweep look right"
    assert approval.details["role"] == "operator"
