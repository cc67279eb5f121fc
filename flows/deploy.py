"""Create kensa's Prefect work pools and deployments (``infra/prefect.yaml``) on a Prefect server.

``prefect.yaml`` is read with the loader ``prefect deploy`` itself uses, so a file that Prefect
would skip is refused here too. Work pools come from the file's ``definitions.pools`` section,
which Prefect ignores (``definitions`` is where Prefect documents YAML anchors go). Applying is
idempotent: what already matches is left alone and reported ``unchanged``.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import TypeAdapter, ValidationError

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient

# The one placeholder kensa resolves at deploy time: the checkout a same-host process worker
# runs flows from. Prefect would otherwise resolve it on the worker, from the worker's env.
REPO_DIR_PLACEHOLDER = "{{ $KENSA_REPO_DIR }}"
GPU_RESOURCE = "nvidia.com/gpu"


class DeployConfigError(ValueError):
    """``prefect.yaml`` does not load, or names pools or entrypoints inconsistently."""


class DeployError(RuntimeError):
    """The Prefect server refused, or cannot be reached, or a pool cannot be made as declared."""


@dataclass(frozen=True)
class PoolSpec:
    """A work pool as declared under ``definitions.pools``."""

    name: str
    type: str
    description: str = ""
    gpus: int = 0  # GPUs each flow run asks for (kubernetes: the container's nvidia.com/gpu)


@dataclass(frozen=True)
class ScheduleSpec:
    """One entry of a deployment's ``schedules:``: every ``interval`` seconds or a ``cron`` line."""

    interval: float | None = None
    cron: str | None = None
    timezone: str | None = None
    active: bool = True

    def key(self) -> tuple[Any, ...]:
        """What decides whether a schedule on the server is this one."""
        return (self.interval, self.cron, self.timezone or "UTC", self.active)


def _schedule(raw: Any, where: str) -> ScheduleSpec:
    from prefect.client.schemas.schedules import CronSchedule

    if not isinstance(raw, dict) or ("interval" in raw) == ("cron" in raw):
        raise DeployConfigError(
            f"{where}: a schedule is a mapping with exactly one of 'interval' "
            f"(seconds) or 'cron' (a cron line); got {raw!r}"
        )
    extra = set(raw) - {"interval", "cron", "timezone", "active"}
    if extra:
        raise DeployConfigError(
            f"{where}: unknown schedule keys {sorted(extra)}; accepted: interval, cron, timezone, active"
        )
    active = raw.get("active", True)
    timezone = raw.get("timezone")
    if "interval" in raw:
        # Prefect's loader hands intervals back as ISO 8601 durations ("PT15M"); seconds also work.
        try:
            seconds = TypeAdapter(timedelta).validate_python(raw["interval"]).total_seconds()
        except ValidationError:
            seconds = 0.0
        if isinstance(raw["interval"], bool) or seconds <= 0:
            raise DeployConfigError(
                f"{where}: interval must be a positive number of seconds; got {raw['interval']!r}"
            )
        return ScheduleSpec(interval=seconds, timezone=timezone, active=bool(active))
    try:  # Prefect's own validation of the cron line and the time zone
        CronSchedule(cron=str(raw["cron"]), timezone=timezone)
    except ValueError as exc:
        raise DeployConfigError(f"{where}: cron {raw['cron']!r} is not valid: {exc}") from None
    return ScheduleSpec(cron=str(raw["cron"]), timezone=timezone, active=bool(active))


def _server_schedule_key(schedule: Any) -> tuple[Any, ...]:
    """The same key for a schedule read back from the server."""
    inner = schedule.schedule
    interval = getattr(inner, "interval", None)
    return (
        interval.total_seconds() if interval is not None else None,
        getattr(inner, "cron", None),
        getattr(inner, "timezone", None) or "UTC",
        bool(schedule.active),
    )


@dataclass(frozen=True)
class DeploymentSpec:
    """One ``deployments:`` entry, as Prefect's loader returned it (pull steps merged in)."""

    name: str
    entrypoint: str  # "path/to/file.py:flow_function", relative to the checkout
    work_pool: str
    work_queue: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    job_variables: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    description: str | None = None
    enforce_parameter_schema: bool = True
    pull_steps: tuple[dict[str, Any], ...] = ()
    schedules: tuple[ScheduleSpec, ...] = ()

    @property
    def entrypoint_file(self) -> str:
        return self.entrypoint.rsplit(":", 1)[0]


@dataclass(frozen=True)
class DeployPlan:
    pools: tuple[PoolSpec, ...]
    deployments: tuple[DeploymentSpec, ...]


@dataclass(frozen=True)
class Applied:
    """What ``apply_plan`` did to one object on the server, for the CLI's table."""

    kind: str  # "work pool" | "deployment"
    name: str
    action: str  # "created" | "updated" | "unchanged" | "skipped"
    detail: str = ""


def load_prefect_yaml(path: Path) -> DeployPlan:
    """Read ``prefect.yaml`` as ``prefect deploy`` does and check kensa's own rules on top.

    Prefect's loader does not raise on a bad file: it prints why and carries on with no
    deployments. Anything it prints is therefore an error here.
    """
    # Private, but it is exactly what `prefect deploy` runs; an upgrade that moves it fails
    # loudly at this import (and in the tests) rather than drifting from Prefect's rules.
    from prefect.cli.deploy._config import _load_deploy_configs_and_actions
    from rich.console import Console

    if not path.is_file():
        raise DeployConfigError(f"{path} does not exist")
    out = io.StringIO()
    console = Console(file=out, width=200, color_system=None)
    configs, actions = _load_deploy_configs_and_actions(path, console=console)
    complaint = out.getvalue().strip()
    if complaint:
        raise DeployConfigError(f"Prefect's loader rejects {path}:\n{complaint}")
    raw = yaml.safe_load(path.read_text()) or {}
    pools = _pools(raw, path)
    pool_names = {p.name for p in pools}
    deployments = []
    for i, cfg in enumerate(configs):
        deployments.append(_deployment(cfg, actions, pool_names, f"{path}: deployments[{i}]"))
    if not deployments:
        raise DeployConfigError(f"{path} declares no deployments")
    names = [d.name for d in deployments]
    if len(set(names)) != len(names):
        raise DeployConfigError(f"{path}: deployment names must be unique; got {names}")
    return DeployPlan(tuple(pools), tuple(deployments))


def _pools(raw: dict[str, Any], path: Path) -> list[PoolSpec]:
    entries = (raw.get("definitions") or {}).get("pools")
    if not isinstance(entries, list) or not entries:
        raise DeployConfigError(f"{path}: definitions.pools must list the work pools (name, type) to create")
    pools = []
    for i, entry in enumerate(entries):
        where = f"{path}: definitions.pools[{i}]"
        if not isinstance(entry, dict) or not entry.get("name") or not entry.get("type"):
            raise DeployConfigError(f"{where} needs a name and a type; got {entry!r}")
        unknown = set(entry) - {"name", "type", "description", "gpus"}
        if unknown:
            raise DeployConfigError(
                f"{where}: unknown keys {sorted(unknown)}; accepted: name, type, description, gpus"
            )
        gpus = entry.get("gpus", 0)
        if not isinstance(gpus, int) or gpus < 0:
            raise DeployConfigError(f"{where}: gpus must be a whole number ≥ 0; got {gpus!r}")
        pools.append(
            PoolSpec(str(entry["name"]), str(entry["type"]), str(entry.get("description", "")), gpus)
        )
    return pools


def _deployment(cfg: dict[str, Any], actions: dict[str, Any], pools: set[str], where: str) -> DeploymentSpec:
    name, entrypoint = cfg.get("name"), cfg.get("entrypoint")
    pool = (cfg.get("work_pool") or {}).get("name")
    if not name or not entrypoint or ":" not in entrypoint:
        raise DeployConfigError(
            f"{where} needs a name and an entrypoint 'file.py:flow'; "
            f"got name={name!r} entrypoint={entrypoint!r}"
        )
    if pool not in pools:
        raise DeployConfigError(
            f"{where} ({name}): work_pool.name {pool!r} is not declared "
            f"under definitions.pools; declared: {sorted(pools)}"
        )
    # A deployment's own pull steps replace the file's top-level ones, as in `prefect deploy`.
    pull = cfg["pull"] if "pull" in cfg else actions.get("pull")
    tags = cfg.get("tags") or []
    if isinstance(tags, str):
        tags = [tags]
    schedules = cfg.get("schedules") or []
    if not isinstance(schedules, list):
        raise DeployConfigError(f"{where} ({name}): schedules must be a list; got {schedules!r}")
    return DeploymentSpec(
        name=name,
        entrypoint=entrypoint,
        work_pool=pool,
        work_queue=(cfg.get("work_pool") or {}).get("work_queue_name"),
        parameters=dict(cfg.get("parameters") or {}),
        job_variables=dict((cfg.get("work_pool") or {}).get("job_variables") or {}),
        tags=tuple(str(t) for t in tags),
        description=cfg.get("description"),
        enforce_parameter_schema=cfg.get("enforce_parameter_schema", True) is not False,
        pull_steps=tuple(pull or ()),
        schedules=tuple(
            _schedule(raw, f"{where} ({name}) schedules[{i}]") for i, raw in enumerate(schedules)
        ),
    )


def pin_repo_dir(steps: Sequence[dict[str, Any]], repo_dir: Path) -> list[dict[str, Any]]:
    """Replace ``{{ $KENSA_REPO_DIR }}`` in pull steps with the checkout's absolute path."""

    def sub(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace(REPO_DIR_PLACEHOLDER, str(repo_dir.resolve()))
        if isinstance(value, dict):
            return {k: sub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [sub(v) for v in value]
        return value

    return [sub(step) for step in steps]


def request_gpus(template: dict[str, Any], gpus: int) -> dict[str, Any]:
    """A Kubernetes base job template whose flow-run container asks for ``gpus`` NVIDIA GPUs.

    Adds a ``gpu_limit`` job variable (default ``gpus``) feeding the container's
    ``nvidia.com/gpu`` limit, and tolerates the taint GPU node pools usually carry.
    """
    tpl = deepcopy(template)
    try:
        pod = tpl["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        properties = tpl["variables"]["properties"]
    except (KeyError, IndexError, TypeError) as exc:
        raise DeployError(
            f"the kubernetes base job template has no pod container ({exc!r}); cannot add the GPU request"
        ) from None
    limits = container.setdefault("resources", {}).setdefault("limits", {})
    limits[GPU_RESOURCE] = "{{ gpu_limit }}"
    pod.setdefault("tolerations", []).append(
        {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
    )
    properties["gpu_limit"] = {
        "title": "GPU limit",
        "type": "integer",
        "minimum": 0,
        "default": gpus,
        "description": f"{GPU_RESOURCE} each flow-run pod asks for.",
    }
    return tpl


async def _pool_template(pool: PoolSpec) -> dict[str, Any]:
    from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type

    # Installed workers first (process is built in); otherwise the server's collection registry,
    # which falls back to the metadata bundled with Prefect when GitHub is out of reach. That is
    # how a kubernetes pool gets its template without prefect-kubernetes installed here.
    template = await get_default_base_job_template_for_infrastructure_type(pool.type)
    if template is None:
        raise DeployError(
            f"no base job template is known for work pool type {pool.type!r} "
            f"({pool.name}); install its worker package (prefect-{pool.type})"
        )
    if pool.gpus and pool.type == "kubernetes":
        template = request_gpus(template, pool.gpus)
    return template


async def ensure_work_pool(client: PrefectClient, pool: PoolSpec) -> Applied:
    """Create the pool, or bring its description and base job template in line."""
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    template = await _pool_template(pool)
    detail = f"type {pool.type}" + (f", {pool.gpus} × {GPU_RESOURCE}" if pool.gpus else "")
    try:
        existing = await client.read_work_pool(pool.name)
    except ObjectNotFound:
        await client.create_work_pool(
            WorkPoolCreate(
                name=pool.name,
                type=pool.type,
                description=pool.description or None,
                base_job_template=template,
            )
        )
        return Applied("work pool", pool.name, "created", detail)
    if existing.type != pool.type:
        # Prefect cannot change a pool's type in place; deleting it would orphan its runs.
        raise DeployError(
            f"work pool {pool.name} exists with type {existing.type!r}, "
            f"prefect.yaml wants {pool.type!r}; delete it first "
            f"(prefect work-pool delete {pool.name}) or rename it"
        )
    if existing.base_job_template == template and (existing.description or "") == pool.description:
        return Applied("work pool", pool.name, "unchanged", detail)
    await client.update_work_pool(
        pool.name, WorkPoolUpdate(description=pool.description or None, base_job_template=template)
    )
    return Applied("work pool", pool.name, "updated", detail)


def _flow_identity(entrypoint: str) -> tuple[str, dict[str, Any]]:
    """The flow's name and parameter schema, read from source as Prefect's runner does.

    Prefect parses the file and runs only its imports (to evaluate annotations), so the flow is
    never called; the imports still cost seconds here (torch, MLflow).
    """
    from prefect.flows import load_flow_arguments_from_entrypoint
    from prefect.utilities.callables import parameter_schema_from_entrypoint

    name = load_flow_arguments_from_entrypoint(entrypoint, ["name"])["name"]
    schema = parameter_schema_from_entrypoint(entrypoint).model_dump()
    return str(name), schema


async def ensure_deployment(client: PrefectClient, spec: DeploymentSpec, repo_dir: Path) -> Applied:
    """Create or update one deployment; a missing entrypoint file is skipped, not an error."""
    from prefect.exceptions import ObjectNotFound

    source = repo_dir / spec.entrypoint_file
    if not source.is_file():
        return Applied(
            "deployment", spec.name, "skipped", f"{spec.entrypoint_file} does not exist yet in {repo_dir}"
        )
    absolute = f"{source.resolve()}:{spec.entrypoint.rsplit(':', 1)[1]}"
    flow_name, schema = await asyncio.to_thread(_flow_identity, absolute)
    desired: dict[str, Any] = {
        "entrypoint": spec.entrypoint,
        "work_pool_name": spec.work_pool,
        "work_queue_name": spec.work_queue or "default",
        "parameters": spec.parameters,
        "job_variables": spec.job_variables,
        "tags": sorted(spec.tags),
        "description": spec.description,
        "enforce_parameter_schema": spec.enforce_parameter_schema,
        "pull_steps": pin_repo_dir(spec.pull_steps, repo_dir),
        "parameter_openapi_schema": schema,
    }
    full_name = f"{flow_name}/{spec.name}"
    try:
        existing = await client.read_deployment_by_name(full_name)
    except ObjectNotFound:
        existing = None
    detail = f"{spec.entrypoint} on {spec.work_pool}"
    if spec.schedules:
        detail += ", " + ", ".join(
            f"every {s.interval:g} s" if s.interval else f"cron '{s.cron}'" for s in spec.schedules
        )
    if existing is not None:
        current = {key: getattr(existing, key) for key in desired}
        current["tags"] = sorted(current["tags"] or [])
        same_schedules = sorted(_server_schedule_key(s) for s in existing.schedules or []) == sorted(
            s.key() for s in spec.schedules
        )
        if current == desired and same_schedules:
            return Applied("deployment", full_name, "unchanged", detail)
    flow_id = await client.create_flow_from_name(flow_name)
    # The server upserts on (flow, name): the same call creates or replaces the deployment, and
    # replaces its schedules with these (none declared = none kept).
    await client.create_deployment(
        flow_id=flow_id, name=spec.name, schedules=_schedule_creates(spec.schedules), **desired
    )
    return Applied("deployment", full_name, "created" if existing is None else "updated", detail)


def _schedule_creates(specs: Sequence[ScheduleSpec]) -> list[Any]:
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import construct_schedule

    return [
        DeploymentScheduleCreate(
            schedule=construct_schedule(interval=s.interval, cron=s.cron, timezone=s.timezone),
            active=s.active,
        )
        for s in specs
    ]


async def apply_plan(plan: DeployPlan, repo_dir: Path) -> list[Applied]:
    """Pools first (deployments name them), then deployments, against the configured API."""
    from prefect.client.orchestration import get_client

    applied: list[Applied] = []
    async with get_client() as client:
        unhealthy = await client.api_healthcheck()
        if unhealthy is not None:
            raise DeployError(f"the Prefect API at {client.api_url} is not reachable: {unhealthy}")
        for pool in plan.pools:
            applied.append(await ensure_work_pool(client, pool))
        for spec in plan.deployments:
            applied.append(await ensure_deployment(client, spec, repo_dir))
    return applied


def deploy(prefect_yaml: Path, api_url: str, repo_dir: Path | None = None) -> list[Applied]:
    """Load ``prefect_yaml`` and apply it to the Prefect server at ``api_url``.

    ``repo_dir`` is the checkout the process worker runs flows from; by default the folder
    that holds the file's ``infra/`` folder.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    plan = load_prefect_yaml(prefect_yaml)
    repo = (repo_dir or prefect_yaml.resolve().parent.parent).resolve()
    # Scoped, not os.environ: the caller's Prefect settings were fixed when prefect was imported.
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        return asyncio.run(apply_plan(plan, repo))
