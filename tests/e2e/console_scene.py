"""A working line for the console's browser tests and screenshots, built from real parts in seconds:
contract ONNX models registered in MLflow (evaluated on labelled grey parts, metrics and plots
logged as flows log them), a real ``kensa serve`` following the champion, parts judged through
``POST /v1/inspect`` (review-band parts become review items), API keys for people, and a drift
alert opened through ``monitoring.alerts`` with control-chart history and an HTML report."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from console_models import NAME, evaluate_and_tag, register_version
from serving_helpers import Server, build_contract_model, solid
from sqlalchemy.orm import Session

from kensa.registry import (
    ALIAS_CANDIDATE,
    ALIAS_CHAMPION,
    TAG_STATUS,
)
from kensa.store.engine import make_engine, make_session_factory
from kensa.store.keys import create_key
from kensa.store.migrate import upgrade
from kensa.store.models import DriftResult, utcnow

CHROMIUM = Path("/usr/bin/chromium")
LINE = "line-1"
# Who works here: key name -> role. The key's name is the person the console records.
PEOPLE = {
    "alice": "operator",
    "bob": "operator",
    "dana": "data-scientist",
    "ada": "admin",
    "audrey": "auditor",
    "mallory": "operator",
    "cam-1": "line",
}
# The project's approval policy: operators and admins decide; nobody approves their own model.
PROJECT_CONFIG = '[approval]\ntwo_person = true\napprover_roles = ["admin", "operator"]\n'

# Every control, image and framed page must carry a name a screen reader can say: the ones that
# do not, as HTML snippets (an empty list on every console page).
UNNAMED_CONTROLS_JS = """() => [...document.querySelectorAll(
    'button, a[href], select, textarea, input:not([type=hidden]), img, iframe, svg[role=img]')]
  .filter(el => !(el.getAttribute('aria-label') || (el.labels && el.labels.length)
                 || el.getAttribute('alt') || el.getAttribute('title') || el.textContent.trim()))
  .map(el => el.outerHTML.slice(0, 120))"""

# An Evidently report is a page of inline scripts; this one also tries to reach the console page
# around it, which the sandbox must stop.
PROBE_REPORT = """<!doctype html><html><head><meta charset="utf-8"><title>Data drift</title></head>
<body><h1>Data drift report</h1><p>Feature <b>f0</b> moved: drift score 0.42.</p>
<p id="probe">scripts did not run</p>
<script>
var probe = document.getElementById("probe");
try { var c = window.parent.document.cookie; probe.textContent = "NOT isolated: " + c.length; }
catch (e) { probe.textContent = "isolated from the console (" + e.name + ")"; }
</script></body></html>
"""


@dataclass
class Scene:
    root: Path
    store_url: str
    mlflow_uri: str
    server: Server
    keys: dict[str, str]
    key_ids: dict[str, int]
    versions: dict[str, str]  # "champion" | "candidate" | "own" -> version
    alert_id: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return self.server.base

    @property
    def console(self) -> str:
        return f"{self.server.base}/console"

    @contextmanager
    def store(self) -> Iterator[Session]:
        engine = make_engine(self.store_url)
        try:
            with make_session_factory(engine)() as session:
                yield session
        finally:
            engine.dispose()

    def inspect(self, image: bytes, *, line: str = LINE, part: str | None = None) -> dict[str, Any]:
        params = {"line_id": line, "camera_id": "cam-1", **({"part_id": part} if part else {})}
        r = httpx.post(
            f"{self.base}/v1/inspect",
            params=params,
            content=image,
            headers={"Authorization": f"Bearer {self.keys['cam-1']}", "content-type": "image/png"},
            timeout=30,
        )
        r.raise_for_status()
        return dict(r.json())


def make_people(store_url: str) -> tuple[dict[str, str], dict[str, int]]:
    upgrade(store_url)
    engine = make_engine(store_url)
    keys, ids = {}, {}
    with make_session_factory(engine)() as session:
        for name, role in PEOPLE.items():
            keys[name], row = create_key(session, name, role)
            ids[name] = row.id
        session.commit()
    engine.dispose()
    return keys, ids


# Components the drift monitor scores (monitoring/policy.py names them "<column>: mean|spread").
MOVERS = ("brightness: mean", "embedding: mean shift", "contrast: spread", "log_sharpness: mean")
WARNING_LEVEL, CRITICAL_LEVEL = 6.0, 9.5


def open_drift_alert(
    scene: Scene,
    *,
    cause: str | None = None,
    level: str = "critical",
    windows: int = 24,
    window_size: int = 8,
) -> int:
    """A drift alert shaped as ``monitoring.drift`` writes one: a drift result per window (score,
    the policy's levels and top movers, verdict counts for the p-charts), the report file, and the
    alert with the components that moved, opened through ``monitoring.alerts.open_alert``."""
    from kensa.monitoring.alerts import open_alert

    reports = scene.root / "data" / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(windows)
    now = utcnow()
    with scene.store() as session:
        for i in range(windows):
            start = now - timedelta(minutes=5 * (windows - i))
            drift = max(0, i - windows + 5)  # the last four windows drift, more and more
            z = [
                -1.2 * drift - rng.normal(0, 0.6),
                1.0 * drift + rng.normal(0, 0.6),
                rng.normal(0, 1),
                rng.normal(0, 1),
            ]
            score = float(sum(v * v for v in z) ** 0.5 * 1.6)
            top = sorted(({"name": n, "z": round(float(v), 3)} for n, v in zip(MOVERS, z, strict=True)),
                         key=lambda c: -abs(c["z"]))  # fmt: skip
            session.add(
                DriftResult(
                    line_id=LINE,
                    camera_id="cam-1",
                    window_size=window_size,
                    window_start=start,
                    window_end=start + timedelta(minutes=5),
                    score=score,
                    level="critical"
                    if score >= CRITICAL_LEVEL
                    else "warning"
                    if score >= WARNING_LEVEL
                    else "none",
                    details={
                        "policy": {
                            "score": score,
                            "warning": WARNING_LEVEL,
                            "critical": CRITICAL_LEVEL,
                            "top": top,
                        },
                        "spc": {
                            "n": window_size,
                            "defect": int(rng.binomial(window_size, 0.12 + 0.05 * drift)),
                            "review": int(rng.binomial(window_size, 0.3)),
                        },
                    },
                    created_at=start + timedelta(minutes=5),
                )
            )
        session.flush()
        report = reports / f"drift-{int(time.time() * 1000)}.html"
        report.write_text(PROBE_REPORT)
        if cause is None:  # worded as the monitor words it
            moved = ", ".join(f"{c['name']} {c['z']:+.1f}σ" for c in top[:3])
            cause = (
                f"{level} drift on line {LINE} camera cam-1: {moved} (score {score:.1f}; "
                f"warning at {WARNING_LEVEL:.1f}, critical at {CRITICAL_LEVEL:.1f})"
            )
        alert = open_alert(
            session,
            level=level,
            kind="drift",
            cause=cause,
            line_id=LINE,
            camera_id="cam-1",
            window_start=now - timedelta(minutes=5),
            window_end=now,
            window_size=window_size,
            top_features=top[:3],
            report_uri=str(report),
            details={
                "key": "drift",
                "score": round(score, 4),
                "estimate": {
                    "n": window_size,
                    "reliable": False,
                    "reason": "the window drifts: probabilities are not trusted for estimates",
                },
            },
        )
        session.commit()
        return alert.id


def build_scene(root: Path, *, parts: int = 24, plots: bool = False, extra_lines: int = 0) -> Scene:
    """Register three versions (champion, candidate, one bob registered), serve the champion,
    judge ``parts`` parts and open one alert. The caller stops ``scene.server``.

    Serving starts while the models are registered (its imports take the longest) and picks the
    champion up on its next poll; polling is fast here so that happens within a second.
    """
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    store = f"sqlite:///{root / 'kensa.db'}"
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    config = root / "kensa.toml"
    config.write_text(PROJECT_CONFIG)
    keys, ids = make_people(store)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    # Created here first, so the server never races this process to set up the tracking database.
    experiment = client.create_experiment("console-e2e", artifact_location=(root / "mlartifacts").as_uri())
    env = {
        "KENSA_REGISTRY_NAME": NAME,
        "KENSA_PROJECT_CONFIG": str(config),
        "KENSA_SESSION_SECRET": "e2e-console-secret",
        "KENSA_SAMPLE_RATE": "0",
        "KENSA_CHAMPION_POLL_S": "1",
    }
    server = Server(data, store, env=env, mlflow_uri=uri)
    started: list[BaseException | None] = []
    starter = threading.Thread(target=lambda: started.append(_start(server)), daemon=True)
    starter.start()
    try:
        bands = {"champion": (0.3, 0.7), "candidate": (0.22, 0.8), "own": (0.35, 0.65)}
        authors = {"champion": "dana", "candidate": "dana", "own": "bob"}
        versions: dict[str, str] = {}
        for i, (role, (t_ok, t_defect)) in enumerate(bands.items()):
            path = build_contract_model(root / f"{role}.onnx", variant=i, t_ok=t_ok, t_defect=t_defect)
            versions[role] = register_version(client, path, experiment)
            evaluate_and_tag(
                uri,
                versions[role],
                path,
                t_ok=t_ok,
                t_defect=t_defect,
                registered_by=authors[role],
                plots=plots,
            )
        client.set_model_version_tag(NAME, versions["champion"], TAG_STATUS, "approved")
        client.set_registered_model_alias(NAME, ALIAS_CHAMPION, versions["champion"])
        client.set_registered_model_alias(NAME, ALIAS_CANDIDATE, versions["candidate"])
        starter.join(120)
        if not started or started[0] is not None:
            raise RuntimeError(f"serving did not start: {started[0] if started else 'timed out'}")
        scene = Scene(root, store, uri, server, keys, ids, versions, alert_id=0)
        # Grey levels: 128 lands in the review band, bright parts pass, dark ones are defects.
        shares = {128: 0.35, 250: 0.25, 230: 0.15, 200: 0.1, 10: 0.1, 30: 0.05}
        levels = np.random.default_rng(11).choice(
            list(shares), size=parts * (1 + extra_lines), p=list(shares.values())
        )
        for i in range(parts):
            scene.inspect(solid(int(levels[i]), noise_seed=i), part=f"P-{1000 + i}")
        for j in range(extra_lines * parts):
            scene.inspect(solid(int(levels[parts + j]), noise_seed=500 + j), line="line-2", part=f"Q-{j}")
        scene.alert_id = open_drift_alert(scene)
    except BaseException:
        starter.join(120)
        server.stop()
        raise
    return scene


def _start(server: Server) -> BaseException | None:
    try:
        server.start(timeout=120)
    except BaseException as exc:  # reported by the thread that waits for it
        return exc
    return None
