"""Real servers for integration tests: start on 127.0.0.1, wait for health, always stop.

Each helper is a context manager around one child process started in its own session, so the
stop signal reaches whatever it spawned (uvicorn workers, a worker's flow-run processes) and
nothing outlives the test. A process that dies or never becomes healthy raises with its log tail.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
PREFECT_YAML = REPO / "infra" / "prefect.yaml"
BIN = Path(sys.executable).parent

# A project config any model passes: the tests check plumbing, not quality. One sweep trial
# keeps a pilot → sweep → candidate run near a minute on a 2-core CPU.
LENIENT_CONFIG = """\
name = "qc-it"
[kpi]
max_escape_rate = 0.99
min_automation_rate = 0.0
max_false_reject_rate = 0.99
max_corrupted_escape_rate = 1.0
max_relative_ce = 100
# One recipe for the pilot and the sweep's only point: the sweep takes the pilot's stage over from
# Prefect's cache, so these modules test tracking and orchestration, not a second training.
[pilot]
model = "tiny_cnn"
epochs = 1
fraction = 0.5
[sweep]
models = ["tiny_cnn"]
fractions = [0.5]
epochs = 1
max_robustness_images = 32
"""
MODEL_NAME = "qc-it"

# Variables of the test process that must not leak into a server or worker started for a test.
_SCRUB_PREFIXES = ("PREFECT_", "KENSA_", "MLFLOW_")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(folder: Path, text: str = LENIENT_CONFIG) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "kensa.toml"
    path.write_text(text)
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without Prefect/kensa/MLflow settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB_PREFIXES)}
    env.update(
        {
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


@dataclass
class Running:
    """A started child process and where its output goes."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    url: str

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def _stop(process: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    """SIGTERM the child's process group, then SIGKILL what is left after ``grace_s``."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@contextmanager
def running(
    name: str,
    cmd: list[str],
    *,
    env: Mapping[str, str],
    log: Path,
    health_url: str,
    url: str,
    cwd: Path,
    timeout_s: float = 120.0,
) -> Iterator[Running]:
    """Start ``cmd`` in ``cwd``, wait until ``health_url`` answers 200, yield it, always stop it.

    ``cwd`` is a temporary folder, never the checkout: nothing a server writes lands in the repo.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        # Own session: the stop signal goes to the whole group the child may fork.
        process = subprocess.Popen(
            cmd, env=dict(env), stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
        )
    server = Running(name, process, log, url)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {process.returncode} before it was healthy:\n{server.log_tail()}"
                )
            try:
                if httpx.get(health_url, timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{name} not healthy at {health_url} after {timeout_s:.0f} s:\n{server.log_tail()}"
                )
            time.sleep(0.5)
        yield server
    finally:
        _stop(process)


@contextmanager
def prefect_server(home: Path, timeout_s: float = 180.0) -> Iterator[Running]:
    """``prefect server start`` on a free port with its SQLite database in ``home``."""
    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    env = clean_env(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    cmd = [
        str(BIN / "prefect"),
        "server",
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-ui",
        "--analytics-off",
    ]
    base = f"http://127.0.0.1:{port}"
    with running(
        "prefect server",
        cmd,
        env=env,
        log=home / "server.log",
        cwd=home,
        health_url=f"{base}/api/health",
        url=f"{base}/api",
        timeout_s=timeout_s,
    ) as s:
        yield s


@contextmanager
def prefect_worker(
    api_url: str,
    pool: str,
    home: Path,
    env: Mapping[str, str],
    timeout_s: float = 120.0,
) -> Iterator[Running]:
    """``prefect worker start --type process`` on ``pool``, healthy once it polls the server.

    ``env`` carries what the flow runs need (``KENSA_*``): a process worker hands its own
    environment to each flow-run process it starts.
    """
    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    worker_env = clean_env(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api_url,
        PREFECT_WORKER_WEBSERVER_HOST="127.0.0.1",
        PREFECT_WORKER_WEBSERVER_PORT=str(port),
        # Poll every 2 s instead of 10 s so a run starts soon after it is scheduled.
        PREFECT_WORKER_QUERY_SECONDS="2",
        PREFECT_LOGGING_LEVEL="INFO",
        **dict(env),
    )
    cmd = [
        str(BIN / "prefect"),
        "worker",
        "start",
        "--pool",
        pool,
        "--type",
        "process",
        "--name",
        f"it-{pool}",
        "--with-healthcheck",
        "--install-policy",
        "never",
        # The pool must come from `kensa deploy`, not be made up by the worker.
        "--no-create-pool-if-not-found",
    ]
    # Started outside the checkout: a run finds flows/ only through the deployment's pull step.
    with running(
        "prefect worker",
        cmd,
        env=worker_env,
        log=home / "worker.log",
        cwd=home,
        health_url=f"http://127.0.0.1:{port}/health",
        url=api_url,
        timeout_s=timeout_s,
    ) as w:
        yield w


@contextmanager
def mlflow_server(
    backend_uri: str,
    artifacts: Path,
    log: Path,
    timeout_s: float = 240.0,
) -> Iterator[Running]:
    """``mlflow server`` on a free port: ``backend_uri`` for runs and registry, artifacts
    proxied by the server into ``artifacts`` (clients only ever see ``mlflow-artifacts:/``)."""
    port = free_port()
    artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        backend_uri,
        "--artifacts-destination",
        artifacts.resolve().as_uri(),
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    base = f"http://127.0.0.1:{port}"
    # Creating the schema on a fresh PostgreSQL database runs every MLflow migration: slow.
    with running(
        "mlflow server",
        cmd,
        env=clean_env(),
        log=log,
        cwd=log.parent,
        health_url=f"{base}/health",
        url=base,
        timeout_s=timeout_s,
    ) as s:
        yield s
