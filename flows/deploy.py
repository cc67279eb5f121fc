"""Apply ``infra/prefect.yaml`` to a Prefect server with Prefect's own tools.

Deployments: ``prefect deploy --all --prefect-file infra/prefect.yaml``, run in the checkout, so
Prefect's loader, schema, build and pull steps, schedules and upsert rules apply unchanged.
Work pools first, since ``prefect deploy`` needs them: the file's ``definitions.pools`` section
(which Prefect ignores) lists them, and each is created or overwritten through Prefect's client as
``prefect work-pool create --overwrite`` does, with Prefect's default base job template for its
type (a kubernetes pool also asks for GPUs). The server is read before and after, so the report
says what changed and a second apply of the same file reports everything ``unchanged``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.responses import DeploymentResponse

GPU_RESOURCE = "nvidia.com/gpu"
DEPLOY_TIMEOUT_S = 900  # `prefect deploy` imports every flow module (torch, MLflow) on a busy CPU


class DeployConfigError(ValueError):
    """``prefect.yaml`` is not valid, for kensa's rules or for ``prefect deploy``."""


class DeployError(RuntimeError):
    """The Prefect server refused, or a pool cannot be made as declared."""


class PrefectUnreachableError(DeployError):
    """No Prefect API answers at the address given."""


@dataclass(frozen=True)
class PoolSpec:
    """A work pool as declared under ``definitions.pools``."""

    name: str
    type: str
    description: str = ""
    gpus: int = 0  # GPUs each flow run asks for (kubernetes: the container's nvidia.com/gpu)


@dataclass(frozen=True)
class DeploymentSpec:
    """What kensa reads of one ``deployments:`` entry; ``prefect deploy`` reads the rest."""

    name: str
    entrypoint: str  # "path/to/file.py:flow_function", relative to the checkout
    work_pool: str

    @property
    def entrypoint_file(self) -> str:
        return self.entrypoint.rsplit(":", 1)[0]


@dataclass(frozen=True)
class DeployPlan:
    pools: tuple[PoolSpec, ...]
    deployments: tuple[DeploymentSpec, ...]


@dataclass(frozen=True)
class Applied:
    """What ``deploy`` did to one object on the server, for the CLI's table."""

    kind: str  # "work pool" | "deployment"
    name: str
    action: str  # "created" | "updated" | "unchanged"
    detail: str = ""


def load_prefect_yaml(path: Path) -> DeployPlan:
    """The pools and deployments of ``path``, checked against kensa's own rules.

    Every deployment names an entrypoint ``file.py:flow`` and a pool declared under
    ``definitions.pools``; names are unique. Prefect's own schema is checked by ``prefect deploy``.
    """
    if not path.is_file():
        raise DeployConfigError(f"{path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DeployConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise DeployConfigError(f"{path} must be a mapping with deployments and definitions.pools")
    pools = _pools(raw, path)
    names = {p.name for p in pools}
    entries = raw.get("deployments")
    if not isinstance(entries, list) or not entries:
        raise DeployConfigError(f"{path} declares no deployments")
    deployments = [_deployment(e, names, f"{path}: deployments[{i}]") for i, e in enumerate(entries)]
    seen = [d.name for d in deployments]
    if len(set(seen)) != len(seen):
        raise DeployConfigError(f"{path}: deployment names must be unique; got {seen}")
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
        if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 0:
            raise DeployConfigError(f"{where}: gpus must be a whole number ≥ 0; got {gpus!r}")
        pools.append(
            PoolSpec(str(entry["name"]), str(entry["type"]), str(entry.get("description", "")), gpus)
        )
    return pools


def _deployment(entry: Any, pools: set[str], where: str) -> DeploymentSpec:
    if not isinstance(entry, dict):
        raise DeployConfigError(f"{where} must be a mapping; got {entry!r}")
    name, entrypoint = entry.get("name"), entry.get("entrypoint")
    if not name or not isinstance(entrypoint, str) or ":" not in entrypoint:
        raise DeployConfigError(
            f"{where} needs a name and an entrypoint 'file.py:flow'; "
            f"got name={name!r} entrypoint={entrypoint!r}"
        )
    pool = (entry.get("work_pool") or {}).get("name")
    if pool not in pools:
        raise DeployConfigError(
            f"{where} ({name}): work_pool.name {pool!r} is not declared "
            f"under definitions.pools; declared: {sorted(pools)}"
        )
    return DeploymentSpec(str(name), entrypoint, str(pool))


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


async def pool_template(pool: PoolSpec) -> dict[str, Any]:
    """The base job template ``prefect work-pool create --type`` would give, plus the GPU request."""
    from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type

    # Installed workers first (process is built in), then the collection metadata bundled with
    # Prefect: a kubernetes pool gets its template without prefect-kubernetes installed here.
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
    """Create the pool, or overwrite its description and base job template when they differ."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    template = await pool_template(pool)
    detail = f"type {pool.type}" + (f", {pool.gpus} × {GPU_RESOURCE}" if pool.gpus else "")
    try:
        existing = await client.read_work_pool(pool.name)
    except ObjectNotFound:
        existing = None
    if existing is not None:
        if existing.type != pool.type:
            # Prefect cannot change a pool's type in place; deleting it would orphan its runs.
            raise DeployError(
                f"work pool {pool.name} exists with type {existing.type!r}, "
                f"prefect.yaml wants {pool.type!r}; delete it first "
                f"(prefect work-pool delete {pool.name}) or rename it"
            )
        if existing.base_job_template == template and (existing.description or "") == pool.description:
            return Applied("work pool", pool.name, "unchanged", detail)
    await client.create_work_pool(
        WorkPoolCreate(
            name=pool.name,
            type=pool.type,
            description=pool.description or None,
            base_job_template=template,
        ),
        overwrite=True,
    )
    return Applied("work pool", pool.name, "created" if existing is None else "updated", detail)


# What `prefect deploy` sets on a deployment; any difference before → after is an update.
_COMPARED = (
    "entrypoint",
    "work_pool_name",
    "work_queue_name",
    "parameters",
    "job_variables",
    "description",
    "enforce_parameter_schema",
    "pull_steps",
    "parameter_openapi_schema",
    "paused",
    "concurrency_limit",
    "version",
)


def _state(d: DeploymentResponse) -> dict[str, Any]:
    state = d.model_dump(mode="json", include=set(_COMPARED))
    state["tags"] = sorted(d.tags or [])
    state["schedules"] = sorted(
        repr((s.schedule.model_dump(mode="json"), s.active, s.parameters, s.slug)) for s in d.schedules or []
    )
    return state


async def _read_deployments(client: PrefectClient, plan: DeployPlan) -> list[DeploymentResponse]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    names = sorted({d.name for d in plan.deployments})
    return await client.read_deployments(
        deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=names))
    )


def prefect_deploy_command(prefect_yaml: Path) -> list[str]:
    """``prefect deploy`` of every deployment in the file, never prompting, with this interpreter."""
    return [
        sys.executable,
        "-m",
        "prefect",
        "--no-prompt",
        "deploy",
        "--all",
        "--prefect-file",
        str(prefect_yaml.resolve()),
    ]


def run_prefect_deploy(prefect_yaml: Path, repo_dir: Path, api_url: str) -> str:
    """Run ``prefect deploy --all`` in ``repo_dir`` against ``api_url``; its output, or why it failed.

    The entrypoints are relative to ``repo_dir``, and the file's build step records it as the
    folder every flow run starts in.
    """
    env = {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "PREFECT_CLI_PROMPT": "false",
        "PREFECT_CLI_COLORS": "false",
        "PREFECT_CLI_WRAP_LINES": "false",
        "PYTHONWARNINGS": "ignore",
        "COLUMNS": "200",
    }
    try:
        done = subprocess.run(
            prefect_deploy_command(prefect_yaml),
            cwd=repo_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=DEPLOY_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise DeployError(f"prefect deploy did not finish in {DEPLOY_TIMEOUT_S} s") from None
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        tail = "\n".join(output.splitlines()[-20:])
        # The server answered a moment ago and the pools exist: what is left is the file.
        raise DeployConfigError(
            f"prefect deploy refused {prefect_yaml} (exit {done.returncode}); Prefect says:\n{tail}"
        )
    return output


def _detail(d: DeploymentResponse) -> str:
    detail = f"{d.entrypoint} on {d.work_pool_name}"
    for s in d.schedules or []:
        interval = getattr(s.schedule, "interval", None)
        cron = getattr(s.schedule, "cron", None)
        if interval is not None:
            detail += f", every {interval.total_seconds():g} s"
        elif cron is not None:
            detail += f", cron '{cron}'"
    return detail


async def apply_plan(plan: DeployPlan, prefect_yaml: Path, repo_dir: Path, api_url: str) -> list[Applied]:
    """Pools through the client, deployments through ``prefect deploy``; what changed, from the server."""
    from prefect.client.orchestration import get_client

    applied: list[Applied] = []
    async with get_client() as client:
        unhealthy = await client.api_healthcheck()
        if unhealthy is not None:
            raise PrefectUnreachableError(f"no Prefect API answers at {api_url}: {unhealthy}")
        for pool in plan.pools:
            applied.append(await ensure_work_pool(client, pool))
        before = {d.id: _state(d) for d in await _read_deployments(client, plan)}
        await asyncio.to_thread(run_prefect_deploy, prefect_yaml, repo_dir, api_url)
        after = await _read_deployments(client, plan)
        flow_names: dict[Any, str] = {}
        for spec in plan.deployments:
            found = [d for d in after if d.name == spec.name and d.entrypoint == spec.entrypoint]
            if not found:
                raise DeployError(f"prefect deploy finished but the server has no deployment {spec.name}")
            d = found[0]
            if d.flow_id not in flow_names:
                flow_names[d.flow_id] = (await client.read_flow(d.flow_id)).name
            if d.id not in before:
                action = "created"
            else:
                action = "unchanged" if before[d.id] == _state(d) else "updated"
            applied.append(Applied("deployment", f"{flow_names[d.flow_id]}/{d.name}", action, _detail(d)))
    return applied


def deploy(prefect_yaml: Path, api_url: str, repo_dir: Path | None = None) -> list[Applied]:
    """Apply ``prefect_yaml``'s pools and deployments to the Prefect server at ``api_url``.

    ``repo_dir`` is the checkout ``prefect deploy`` runs in and the process worker runs flows
    from; by default the folder that holds the file's ``infra/`` folder.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    plan = load_prefect_yaml(prefect_yaml)
    repo = (repo_dir or prefect_yaml.resolve().parent.parent).resolve()
    missing = sorted(
        {d.entrypoint_file for d in plan.deployments if not (repo / d.entrypoint_file).is_file()}
    )
    if missing:
        raise DeployConfigError(
            f"entrypoint files {missing} are not in {repo}, the checkout prefect deploy runs in "
            "(pass --repo-dir)"
        )
    # Scoped, not os.environ: the caller's Prefect settings were fixed when prefect was imported.
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        return asyncio.run(apply_plan(plan, prefect_yaml, repo, api_url))
