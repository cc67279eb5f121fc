"""The audit bundle's format: its layout, the SHA-256 manifest, and safe packing and unpacking.

A bundle is one ``.tar.gz`` holding a single folder. ``MANIFEST.sha256`` lists every other file
as ``<sha256>  <path>`` (the format ``sha256sum -c`` reads), so anyone can re-check it with
standard tools. Nothing here talks to MLflow or the store: export and verify both build on it.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from kensa.governance.modelcard import DECISIONS, CardEvidence

FORMAT = "kensa-audit/1"
MANIFEST = "MANIFEST.sha256"
BUNDLE_JSON = "bundle.json"
README = "README.md"
CARD_MD = "model_card.md"
CARD_HTML = "model_card.html"
ONNX = "model/model.onnx"
ONNX_METADATA = "model/onnx_metadata.json"
MODEL_VERSION = "registry/model_version.json"
METRICS = "evaluation/metrics.json"
BAND = "evaluation/band.json"
PARITY = "evaluation/parity.json"
PARITY_SAMPLE = "evaluation/parity_sample.json"
GATE = "evaluation/kpi_gate.json"
SWEEP = "evaluation/sweep.json"
PLOTS_DIR = "evaluation/plots"
DATASET = "data/kensa-dataset.json"
TRAINING_CONFIG = "config/training_config.json"
RUNS = "config/mlflow_runs.json"
PROJECT_CONFIG = "config/project_config.json"
CODE = "code/code_version.json"
EVENTS = "audit/events.jsonl"
CHAIN = "audit/chain.json"
APPROVALS = "audit/approvals.json"

# Bounds on what verify will unpack: a bundle is evidence, not a place for arbitrary payloads.
MAX_FILE_BYTES = 2 << 30
MAX_FILES = 10_000


class BundleError(ValueError):
    """The file is not a readable kensa audit bundle (the CLI's exit code 2)."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_path(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def bundle_files(root: Path) -> list[str]:
    """Every regular file under ``root`` (POSIX paths, sorted) except the manifest itself."""
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).as_posix() != MANIFEST
    )


def write_manifest(root: Path) -> str:
    """Write ``MANIFEST.sha256`` over every file in ``root``; returns the manifest's own SHA-256."""
    lines = [f"{sha256_path(root / rel)}  {rel}\n" for rel in bundle_files(root)]
    text = "".join(lines).encode("utf-8")
    (root / MANIFEST).write_bytes(text)
    return sha256_bytes(text)


def parse_manifest(text: str) -> dict[str, str]:
    """``path -> sha256`` from manifest text; BundleError on a line that is not ``<hex>  <path>``."""
    entries: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not rel:
            raise BundleError(f"{MANIFEST} line {n} is not '<sha256>  <path>': {line[:80]!r}")
        if rel in entries:
            raise BundleError(f"{MANIFEST} lists {rel} twice")
        entries[rel] = digest
    return entries


def pack(root: Path, out: Path, mtime: float) -> None:
    """Tar and gzip ``root`` as one folder named after it; fixed mtime and order, no owners."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for rel in [*bundle_files(root), MANIFEST]:
            data = (root / rel).read_bytes()
            info = tarfile.TarInfo(f"{root.name}/{rel}")
            info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(out)


def _safe_member(member: tarfile.TarInfo, top: str | None) -> tuple[str, str]:
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise BundleError(f"unsafe path in the archive: {member.name!r}")
    if not (member.isfile() or member.isdir()):
        raise BundleError(f"{member.name!r} is a link or device; a bundle holds plain files only")
    if top is not None and path.parts[0] != top:
        raise BundleError(f"the archive must hold one folder; found {path.parts[0]!r} next to {top!r}")
    if member.size > MAX_FILE_BYTES:
        raise BundleError(f"{member.name!r} is larger than {MAX_FILE_BYTES} bytes")
    return path.parts[0], "/".join(path.parts[1:])


def unpack(archive: Path, dest: Path) -> Path:
    """Extract a bundle into ``dest`` after checking every member; returns the bundle folder."""
    if not archive.is_file():
        raise BundleError(f"{archive} does not exist")
    try:
        tar = tarfile.open(archive, "r:gz")  # noqa: SIM115 - closed by the with block below
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"{archive} is not a .tar.gz archive ({exc})") from None
    top: str | None = None
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise BundleError(f"{archive} is truncated or corrupt ({exc})") from None
        if len(members) > MAX_FILES:
            raise BundleError(f"{archive} holds {len(members)} entries; at most {MAX_FILES} accepted")
        for member in members:
            top, rel = _safe_member(member, top)
            if not member.isfile() or not rel:
                continue
            target = dest / top / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            if source is None:
                raise BundleError(f"{member.name!r} cannot be read")
            try:
                target.write_bytes(source.read())
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise BundleError(f"{archive} is truncated or corrupt at {member.name} ({exc})") from None
    if top is None:
        raise BundleError(f"{archive} is empty")
    root = dest / top
    for required in (BUNDLE_JSON, MANIFEST):
        if not (root / required).is_file():
            raise BundleError(f"{archive} has no {required}; it is not a kensa audit bundle")
    info = read_json(root, BUNDLE_JSON)
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else None
        raise BundleError(f"{BUNDLE_JSON} has format {found!r}; this kensa reads {FORMAT!r}")
    return root


def read_json(root: Path, rel: str) -> Any:
    """A JSON file of the bundle; BundleError naming it when unreadable."""
    try:
        return json.loads((root / rel).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{rel} cannot be read as JSON ({exc})") from None


def read_optional(root: Path, rel: str) -> Any:
    return read_json(root, rel) if (root / rel).is_file() else None


def read_events(root: Path) -> list[dict[str, Any]]:
    """The audit events in ``audit/events.jsonl``, one JSON object per line."""
    path = root / EVENTS
    if not path.is_file():
        return []
    events = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BundleError(f"{EVENTS} line {n} is not JSON ({exc})") from None
        if not isinstance(event, dict):
            raise BundleError(f"{EVENTS} line {n} is not a JSON object")
        events.append(event)
    return events


def write_json(root: Path, rel: str, payload: Any) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def decisions(events: list[dict[str, Any]], version: str) -> list[dict[str, Any]]:
    """The approval decisions among ``events`` that concern ``version``, oldest first."""
    out = []
    for e in events:
        if e.get("action") not in DECISIONS:
            continue
        details = e.get("details") or {}
        out.append(
            {
                "event_id": e.get("id"),
                "at": e.get("created_at"),
                "actor": e.get("actor"),
                "action": e.get("action"),
                "subject": e.get("subject"),
                "role": details.get("role"),
                "reason": details.get("reason"),
                "sha256": details.get("sha256"),
                "applies_to_version": str(e.get("subject", "")).rsplit("/", 1)[-1] == version,
            }
        )
    return out


@dataclass(frozen=True)
class BundleView:
    """A bundle on disk, read into the pieces the card and the checks use."""

    root: Path
    info: dict[str, Any]
    model_version: dict[str, Any]
    metadata: dict[str, Any]
    events: list[dict[str, Any]]
    unreadable: tuple[str, ...] = ()  # evidence files that could not be parsed (tampered?)

    @property
    def name(self) -> str:
        return str(self.model_version.get("name", ""))

    @property
    def version(self) -> str:
        return str(self.model_version.get("version", ""))

    @property
    def tags(self) -> dict[str, str]:
        tags = self.model_version.get("tags") or {}
        return {str(k): str(v) for k, v in tags.items()} if isinstance(tags, dict) else {}

    def plots(self) -> Iterator[str]:
        folder = self.root / PLOTS_DIR
        if folder.is_dir():
            yield from sorted(p.relative_to(self.root).as_posix() for p in folder.glob("*.png"))


def read_view(root: Path) -> BundleView:
    """The bundle's core records; an unreadable event log is noted for the checks, not fatal."""
    mv = read_json(root, MODEL_VERSION) if (root / MODEL_VERSION).is_file() else {}
    meta = read_optional(root, ONNX_METADATA) or {}
    unreadable: tuple[str, ...] = ()
    try:
        events = read_events(root)
    except BundleError as exc:
        events, unreadable = [], (str(exc),)
    return BundleView(
        root,
        read_json(root, BUNDLE_JSON),
        mv if isinstance(mv, dict) else {},
        meta if isinstance(meta, dict) else {},
        events,
        unreadable,
    )


def card_evidence(view: BundleView) -> CardEvidence:
    """The card's evidence, read from the bundle's own files (export and verify share this)."""
    dataset = read_optional(view.root, DATASET)
    if isinstance(dataset, dict):
        dataset = {k: v for k, v in dataset.items() if k != "records"}
    aliases = view.model_version.get("aliases") or []
    return CardEvidence(
        name=view.name,
        version=view.version,
        tags=view.tags,
        aliases=[str(a) for a in aliases] if isinstance(aliases, list) else [],
        registered_at=str(view.model_version.get("registered_at", "")),
        metadata=view.metadata,
        metrics=read_optional(view.root, METRICS),
        band=read_optional(view.root, BAND),
        parity=read_optional(view.root, PARITY),
        dataset=dataset,
        gate=read_optional(view.root, GATE),
        events=view.events,
        plots=list(view.plots()),
    )
