"""`kensa audit verify --live`: compare a bundle with the live audit trail and registry (read only).

Offline checks prove a bundle is self-consistent; a forger who rebuilds every hash passes them.
The store's trail and the registry are the anchors a forger does not control: every bundled
event must still be in the store with the same hash, and the store must hold no event about the
version (up to the export) that the bundle leaves out, such as a removed approval.
"""

from __future__ import annotations

import json

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from kensa.governance.bundle import CHAIN, ONNX, BundleView, read_optional, sha256_path
from kensa.governance.verify import CheckFailed
from kensa.registry import TAG_DATASET_VERSION, TAG_KPI, TAG_REGISTERED_BY, TAG_SHA256, TAG_THRESHOLDS
from kensa.settings import Settings
from kensa.store.audit import verify_chain
from kensa.store.engine import display_url, make_engine, make_session_factory
from kensa.store.models import AuditEvent

# Tags fixed at registration; status and aliases legitimately change after an export.
IMMUTABLE_TAGS = (TAG_SHA256, TAG_DATASET_VERSION, TAG_THRESHOLDS, TAG_KPI, TAG_REGISTERED_BY)


def _concerns(subject: str, details: object, name: str, version: str) -> bool:
    if subject == f"model:{name}/{version}":
        return True
    d = details if isinstance(details, dict) else {}
    return subject.startswith(f"model:{name}/") and version in (
        str(d.get("from_version")),
        str(d.get("previous_champion")),
    )


def check_live_trail(view: BundleView, settings: Settings) -> str:
    """Bundled events against the store's rows; no engine migration, no writes."""
    chain = read_optional(view.root, CHAIN) or {}
    head = chain.get("head_at_export") or {}
    engine = make_engine(settings.resolved_store_url)
    try:
        with make_session_factory(engine)() as session:
            problems = [str(p) for p in verify_chain(session)]
            bundled = {e["id"]: e for e in view.events}
            rows = {r.id: r for r in session.scalars(select(AuditEvent).where(AuditEvent.id.in_(bundled)))}
            for event_id, e in bundled.items():
                row = rows.get(event_id)
                if row is None:
                    problems.append(f"event {event_id} ({e.get('action')}) is not in the store")
                elif row.hash != e.get("hash"):
                    problems.append(f"event {event_id} ({e.get('action')}) differs from the store's")
            head_id = head.get("id")
            if isinstance(head_id, int):
                stored_head = session.get(AuditEvent, head_id)
                if stored_head is None or stored_head.hash != head.get("hash"):
                    problems.append(f"the trail's head at export (event {head_id}) is not in the store")
                live = session.execute(
                    select(AuditEvent.id, AuditEvent.action, AuditEvent.subject, AuditEvent.details).where(
                        AuditEvent.id <= head_id, AuditEvent.subject.like(f"model:{view.name}/%")
                    )
                ).all()
                left_out = [
                    f"{i} ({a})"
                    for i, a, s, d in live
                    if _concerns(s, d, view.name, view.version) and i not in bundled
                ]
                if left_out:
                    problems.append(
                        "the store has event(s) about this version that the bundle leaves "
                        "out: " + ", ".join(left_out)
                    )
    except SQLAlchemyError as exc:
        raise CheckFailed(
            f"cannot read the store at {display_url(settings.resolved_store_url)} ({type(exc).__name__})"
        ) from None
    finally:
        engine.dispose()
    if problems:
        raise CheckFailed("; ".join(problems))
    return f"{len(view.events)} events match the store at {display_url(settings.resolved_store_url)}"


def check_live_registry(view: BundleView, settings: Settings) -> str:
    uri = settings.resolved_mlflow_uri
    client = MlflowClient(uri, uri)
    try:
        live = client.get_model_version(view.name, view.version).tags
    except MlflowException as exc:
        raise CheckFailed(
            f"{view.name}/{view.version} is not in the registry ({exc.message.splitlines()[0]})"
        ) from None
    differs = []
    for tag in IMMUTABLE_TAGS:
        mine, theirs = view.tags.get(tag), live.get(tag)
        if tag in (TAG_THRESHOLDS, TAG_KPI):  # JSON: compare values, not spelling
            try:
                same = json.loads(mine or "null") == json.loads(theirs or "null")
            except json.JSONDecodeError:
                same = False
        else:
            same = mine == theirs
        if not same:
            differs.append(tag)
    problems = ["the registry's " + ", ".join(differs) + " differ from the bundle's"] if differs else []
    actual = sha256_path(view.root / ONNX)
    if actual != live.get(TAG_SHA256):
        problems.append(
            f"the bundled ONNX file ({actual[:12]}…) is not the registered one "
            f"({str(live.get(TAG_SHA256))[:12]}…)"
        )
    if problems:
        raise CheckFailed("; ".join(problems))
    return f"registration tags match the registry ({', '.join(IMMUTABLE_TAGS[:2])}, …)"
