"""Static checks of infra/ (compose, Kubernetes, prefect.yaml, Dockerfiles) for tests/unit/test_infra.py.

There is no container engine or cluster here, so each file is checked against the schema its tool
uses (the Compose Specification, Kubernetes' OpenAPI schemas via kubernetes-validate, Prefect's
own prefect.yaml loader) and then against rules a schema cannot express: secrets without
defaults, GPU reservations, health checks, probes on routes that exist, commands the kensa CLI
really has. Every function returns a list of problems, each naming what is wrong and where.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import typer
import yaml
from typer.core import TyperGroup

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
COMPOSE_SCHEMA = Path(__file__).parent / "unit" / "schemas" / "compose-spec.json"
K8S_VERSION = "1.33"  # the oldest Kubernetes kensa's manifests target; kubernetes-validate ships it

# Variables that hold credentials: never defaulted, never written in clear.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$|ACCESS_KEY|ROOT_USER")
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")
URL_PASSWORD = re.compile(r"://[^:/@\s]+:([^@\s]+)@")
# Environment variables that look like settings but belong to something else.
# KENSA_REPO_DIR: the images' checkout path (/opt/kensa), where `kensa deploy --repo-dir` points.
NOT_SETTINGS = {"KENSA_REPO_DIR"}
GPU_RESOURCE = "nvidia.com/gpu"


# ---------------------------------------------------------------------------------------------
# What the project really has: settings, CLI commands, serving routes, packages.


def settings_env_names() -> set[str]:
    from kensa.settings import Settings

    return {f"KENSA_{name.upper()}" for name in Settings.model_fields}


def kensa_cli() -> TyperGroup:
    from kensa.cli.main import app

    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)
    return group


def check_kensa_args(args: list[str], where: str) -> list[str]:
    """``args`` after ``kensa`` must name a real (sub)command and parse with its options."""
    # typer ships its own copy of click: its classes, not the click package's.
    cmd: Any = kensa_cli()
    path = ["kensa"]
    rest = list(args)
    while isinstance(cmd, TyperGroup) and rest and not rest[0].startswith("-"):
        ctx = typer.Context(cmd, info_name=path[-1])
        sub = cmd.get_command(ctx, rest[0])
        if sub is None:
            known = ", ".join(sorted(cmd.list_commands(ctx)))
            return [f"{where}: `{' '.join(path)} {rest[0]}` is not a kensa command (known: {known})"]
        path.append(rest.pop(0))
        cmd = sub
    if isinstance(cmd, TyperGroup):
        return [f"{where}: `{' '.join(path)}` needs a subcommand"]
    try:
        cmd.make_context(" ".join(path), list(rest), resilient_parsing=False)  # it consumes the list
    except typer.TyperException as exc:
        return [f"{where}: `{' '.join(path + rest)}` does not parse: {exc.format_message()}"]
    return []


def serving_routes() -> set[tuple[str, str]]:
    from kensa.serving.routes import admin, inspect, metrics, v2

    return {
        (method, route.path)
        for module in (inspect, v2, admin, metrics)
        for route in module.router.routes
        for method in getattr(route, "methods", set())
    }


def check_probe_path(path: str, where: str) -> list[str]:
    """A probe must hit a GET route that exists and needs no key (probes carry none)."""
    from kensa.serving.security.auth import PUBLIC

    if ("GET", path) not in serving_routes():
        return [f"{where}: probe path {path} is not a serving route"]
    if ("GET", path) not in PUBLIC:
        return [f"{where}: probe path {path} needs an API key; probes carry none"]
    return []


def project_packages() -> list[str]:
    """What a kensa image must copy to build the wheel: setup.py and every folder it maps."""
    tree = ast.parse((REPO / "setup.py").read_text())
    parts = next(
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "PARTS" for t in n.targets)
    )
    assert isinstance(parts, ast.Dict)
    return ["setup.py", "kensa", *(ast.literal_eval(v) for v in parts.values)]


def check_settings_names(names: list[str], where: str) -> list[str]:
    known = settings_env_names()
    return [
        f"{where}: {name} is not a kensa setting (kensa.settings.Settings has no field "
        f"{name.removeprefix('KENSA_').lower()})"
        for name in names
        if name.startswith("KENSA_") and name not in known and name not in NOT_SETTINGS
    ]


# ---------------------------------------------------------------------------------------------
# Compose


def load_yaml_documents(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def check_compose_schema(doc: Any) -> list[str]:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    problems = []
    for error in sorted(validator.iter_errors(doc), key=lambda e: e.json_path):
        detail = _deepest(error)
        problems.append(f"{detail.json_path}: {detail.message[:300]}")
    return problems


def _deepest(error: jsonschema.ValidationError) -> jsonschema.ValidationError:
    """A oneOf failure says only "not valid under any of the given schemas"; the branch error
    deepest in the document (the branch that matched furthest) says what is actually wrong."""
    if not error.context:
        return error
    return _deepest(max(error.context, key=lambda e: len(e.absolute_path)))


def _strings(value: Any, where: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{where}[{i}]")


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _has_gpu(service: dict[str, Any]) -> bool:
    resources = (service.get("deploy") or {}).get("resources") or {}
    devices = (resources.get("reservations") or {}).get("devices")
    return any("gpu" in (d.get("capabilities") or []) for d in devices or [] if isinstance(d, dict))


def _is_one_shot(name: str, services: dict[str, Any]) -> bool:
    # A job others wait for with service_completed_successfully, or one that never restarts.
    waited = any(
        isinstance(s.get("depends_on"), dict)
        and (s["depends_on"].get(name) or {}).get("condition") == "service_completed_successfully"
        for s in services.values()
    )
    return waited or str(services[name].get("restart", "")) == "no"


def _command(service: dict[str, Any]) -> list[str]:
    for key in ("entrypoint", "command"):
        value = service.get(key)
        if isinstance(value, str):
            service = {**service, key: shlex.split(value)}
    entry = service.get("entrypoint") or []
    return [*entry, *(service.get("command") or [])]


def check_compose_rules(doc: dict[str, Any], *, gpu_services: tuple[str, ...]) -> list[str]:
    """Secrets, GPUs, health checks, start order and commands: what the schema cannot say."""
    problems: list[str] = []
    services: dict[str, Any] = doc.get("services") or {}
    required_vars: dict[str, str] = {}
    for where, text in _strings(doc, "compose"):
        for match in INTERPOLATION.finditer(text.replace("$$", "")):
            var, op, arg = match.group(1), match.group(2), match.group(3) or ""
            if SECRET_NAME.search(var):
                if op != ":?":
                    problems.append(
                        f"{where}: secret ${{{var}}} must be required as ${{{var}:?message}}, "
                        f"never defaulted or optional"
                    )
                elif not arg.strip():
                    problems.append(f"{where}: ${{{var}:?}} needs a message saying how to set it")
                required_vars[var] = where
        for match in URL_PASSWORD.finditer(text):
            if not match.group(1).startswith("${"):
                problems.append(f"{where}: a password is written in clear in a URL")
    for name, service in services.items():
        where = f"services.{name}"
        env = _env(service)
        for key, value in env.items():
            if SECRET_NAME.search(key) and "${" not in value:
                problems.append(
                    f"{where}.environment.{key}: a secret written in clear; use ${{VAR:?message}}"
                )
        problems += check_settings_names(list(env), f"{where}.environment")
        if "image" not in service and "build" not in service:
            problems.append(f"{where}: neither image nor build")
        one_shot = _is_one_shot(name, services)
        health = service.get("healthcheck") or {}
        if not one_shot and (not health or health.get("disable")):
            problems.append(f"{where}: a long-running service needs a healthcheck")
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            problems.append(
                f"{where}.depends_on: use the long form with a condition, so start order "
                "waits for health, not just for the container to exist"
            )
            depends = {}
        for dep, spec in depends.items():
            if dep not in services:
                problems.append(f"{where}.depends_on: {dep} is not a service")
                continue
            condition = (spec or {}).get("condition")
            wanted = "service_completed_successfully" if _is_one_shot(dep, services) else "service_healthy"
            if condition != wanted:
                problems.append(f"{where}.depends_on.{dep}: condition {condition!r}; use {wanted!r}")
        if name in gpu_services and not _has_gpu(service):
            problems.append(
                f"{where}: needs a GPU reservation (deploy.resources.reservations.devices "
                "with capabilities [gpu])"
            )
        image = str(service.get("image", ""))
        build = service.get("build") or {}
        dockerfile = build.get("dockerfile", "") if isinstance(build, dict) else ""
        if "kensa:" in image or str(dockerfile).endswith(("infra/Dockerfile", "infra/Dockerfile.cuda")):
            args = _command(service)
            if args and args[0] != "prefect":
                problems += check_kensa_args(args, f"{where}.command")
    for name in gpu_services:
        if name not in services:
            problems.append(f"services.{name} is missing")
    return problems


# ---------------------------------------------------------------------------------------------
# Kubernetes


def check_k8s_schema(docs: list[Any], where: str) -> list[str]:
    problems = []
    for i, doc in enumerate(docs):
        label = f"{where}[{i}] {doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{label}: {path}: {exc.message[:300]}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{label}: {exc.message}")
    return problems


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
    return list(spec.get("containers") or [])


def _labels_match(selector: dict[str, Any], labels: dict[str, Any]) -> bool:
    wanted = selector.get("matchLabels") or {}
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


@dataclass
class K8sIndex:
    by_kind: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def add(self, doc: dict[str, Any]) -> None:
        self.by_kind.setdefault(doc.get("kind", ""), []).append(doc)

    def named(self, kind: str, name: str) -> dict[str, Any] | None:
        return next((d for d in self.by_kind.get(kind, []) if _name(d) == name), None)


def _name(doc: dict[str, Any]) -> str:
    meta = doc.get("metadata") or {}
    return str(meta.get("name") or meta.get("generateName") or "?")


def _env_problems(container: dict[str, Any], where: str) -> list[str]:
    problems = []
    names = [e.get("name", "") for e in container.get("env") or []]
    problems += check_settings_names(names, where)
    for e in container.get("env") or []:
        value = str(e.get("value", ""))
        if (SECRET_NAME.search(e.get("name", "")) or URL_PASSWORD.search(value)) and "value" in e:
            problems.append(
                f"{where}.{e.get('name')}: a secret written in the manifest; use valueFrom.secretKeyRef"
            )
    return problems


def check_k8s_rules(
    docs: list[dict[str, Any]], *, serving: str, worker: str, worker_pools: dict[str, str]
) -> list[str]:
    """Serving: GPU, probes on real public routes, HPA and PDB that point at it; the worker's pool."""
    index = K8sIndex()
    for doc in docs:
        index.add(doc)
    problems: list[str] = []
    for kind, items in index.by_kind.items():
        for doc in items:
            if kind == "ConfigMap":
                problems += check_settings_names(list(doc.get("data") or {}), f"ConfigMap/{_name(doc)}")
            for c in _containers(doc):
                cw = f"{kind}/{_name(doc)}/{c.get('name')}"
                problems += _env_problems(c, f"{cw}.env")
                if str(c.get("image", "")).startswith("kensa:"):  # the kensa image: a kensa command
                    args = [*(c.get("command") or []), *(c.get("args") or [])]
                    problems += check_kensa_args(args[1:] if args[:1] == ["kensa"] else args, f"{cw}.args")
    deployment = index.named("Deployment", serving)
    if deployment is None:
        return [*problems, f"Deployment/{serving} is missing"]
    where = f"Deployment/{serving}"
    pod_labels = ((deployment["spec"].get("template") or {}).get("metadata") or {}).get("labels") or {}
    containers = _containers(deployment)
    if not containers:
        problems.append(f"{where}: no containers")
    for c in containers:
        cw = f"{where}/{c.get('name')}"
        limits = (c.get("resources") or {}).get("limits") or {}
        if str(limits.get(GPU_RESOURCE, "0")) in ("0", ""):
            problems.append(f"{cw}: resources.limits needs {GPU_RESOURCE}")
        for probe, expected in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
            path = ((c.get(probe) or {}).get("httpGet") or {}).get("path")
            if path is None:
                problems.append(f"{cw}: {probe} must be an httpGet probe on {expected}")
                continue
            problems += check_probe_path(path, f"{cw}.{probe}")
            if path != expected:
                problems.append(f"{cw}.{probe}: path {path}; the {probe[:-5]} route is {expected}")
    hpas = [
        h
        for h in index.by_kind.get("HorizontalPodAutoscaler", [])
        if (h["spec"].get("scaleTargetRef") or {}).get("name") == serving
    ]
    if not hpas:
        problems.append(f"no HorizontalPodAutoscaler scales Deployment/{serving}")
    for h in index.by_kind.get("HorizontalPodAutoscaler", []):
        target = h["spec"].get("scaleTargetRef") or {}
        if index.named(target.get("kind", ""), target.get("name", "")) is None:
            problems.append(
                f"HorizontalPodAutoscaler/{h['metadata']['name']}: scaleTargetRef "
                f"{target.get('kind')}/{target.get('name')} does not exist"
            )
    pdbs = [
        p
        for p in index.by_kind.get("PodDisruptionBudget", [])
        if _labels_match(p["spec"].get("selector") or {}, pod_labels)
    ]
    if not pdbs:
        problems.append(f"no PodDisruptionBudget selects the pods of Deployment/{serving}")
    services = [
        s
        for s in index.by_kind.get("Service", [])
        if (s["spec"].get("selector") or {})
        and all(pod_labels.get(k) == v for k, v in s["spec"]["selector"].items())
    ]
    if not services:
        problems.append(f"no Service selects the pods of Deployment/{serving}")
    problems += _check_worker(index, worker, worker_pools)
    return problems


def _flag(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _check_worker(index: K8sIndex, worker: str, pools: dict[str, str]) -> list[str]:
    deployment = index.named("Deployment", worker)
    if deployment is None:
        return [f"Deployment/{worker} is missing"]
    where = f"Deployment/{worker}"
    problems: list[str] = []
    (c, *_) = _containers(deployment) or [{}]
    args = [*(c.get("command") or []), *(c.get("args") or [])]
    pool, kind = _flag(args, "--pool"), _flag(args, "--type")
    if pool not in pools:
        problems.append(f"{where}: --pool {pool} is not a work pool of infra/prefect.yaml ({sorted(pools)})")
    elif pools[pool] != kind:
        problems.append(f"{where}: --type {kind}, but pool {pool} is of type {pools[pool]}")
    template_path = _flag(args, "--base-job-template")
    if template_path is None:
        return [*problems, f"{where}: no --base-job-template (the GPU request lives there)"]
    template = None
    for cm in index.by_kind.get("ConfigMap", []):
        for vol in (deployment["spec"]["template"]["spec"]).get("volumes") or []:
            if (vol.get("configMap") or {}).get("name") == cm["metadata"]["name"]:
                for key, text in (cm.get("data") or {}).items():
                    if template_path.endswith("/" + key):
                        template = text
    if template is None:
        return [*problems, f"{where}: {template_path} is not mounted from a ConfigMap here"]
    return problems + check_job_template(json.loads(template), f"{where} {template_path}")


def check_job_template(template: dict[str, Any], where: str) -> list[str]:
    """Prefect's own work-pool model accepts it, and the Job it renders asks for a GPU and validates."""
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.templating import apply_values
    from pydantic import ValidationError

    try:
        WorkPoolCreate(name="cloud-gpu", type="kubernetes", base_job_template=template)
    except ValidationError as exc:
        return [f"{where}: Prefect rejects the base job template: {exc.errors()[0]['msg']}"]
    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    defaults.setdefault("name", "flow-run")
    job = apply_values(template["job_configuration"]["job_manifest"], defaults, remove_notset=True)
    problems = check_k8s_schema([job], f"{where} (rendered with its defaults)")
    containers = _containers(job)
    gpu = (
        str(((containers[0].get("resources") or {}).get("limits") or {}).get(GPU_RESOURCE, "0"))
        if containers
        else "0"
    )
    if gpu in ("0", ""):
        problems.append(f"{where}: the flow-run Job requests no {GPU_RESOURCE}")
    return problems


# ---------------------------------------------------------------------------------------------
# prefect.yaml


def flow_functions(source: Path) -> set[str]:
    """Names of the functions in ``source`` decorated with Prefect's ``@flow`` (or ``@flow(...)``)."""
    tree = ast.parse(source.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for dec in node.decorator_list:
                target = dec.func if isinstance(dec, ast.Call) else dec
                if (isinstance(target, ast.Name) and target.id == "flow") or (
                    isinstance(target, ast.Attribute) and target.attr == "flow"
                ):
                    names.add(node.name)
    return names


def check_prefect_yaml(path: Path) -> tuple[list[str], dict[str, str]]:
    """kensa deploy's reader (pools; deployments on declared pools), then every entrypoint names a
    real flow. Prefect's own schema is checked by `prefect deploy` (test_prefect_server.py).

    Returns the problems and the work pools (name -> type) the file declares.
    """
    from kensa.flows.deploy import DeployConfigError, load_prefect_yaml

    try:
        plan = load_prefect_yaml(path)
    except DeployConfigError as exc:
        return [str(exc)], {}
    problems = []
    for d in plan.deployments:
        file, _, func = d.entrypoint.rpartition(":")
        source = REPO / file
        if not source.is_file():
            problems.append(f"deployment {d.name}: entrypoint file {file} does not exist")
        elif func not in flow_functions(source):
            problems.append(
                f"deployment {d.name}: {file} has no @flow function {func!r} "
                f"(flows there: {sorted(flow_functions(source))})"
            )
    pools = {p.name: p.type for p in plan.pools}
    for name, kind in pools.items():
        if kind not in ("process", "kubernetes", "docker"):
            problems.append(f"work pool {name}: type {kind!r} has no worker in kensa's infra")
    return problems, pools


# ---------------------------------------------------------------------------------------------
# Dockerfiles


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str
    line: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (enough to check)."""
    out: list[Instruction] = []
    buffer, start = "", 0
    for n, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):
            continue
        if not buffer:
            start = n
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        keyword, _, value = buffer.partition(" ")
        out.append(Instruction(keyword.upper(), value.strip(), start))
        buffer = ""
    return out


def _exec_form(value: str) -> list[str] | None:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return None
    return [str(x) for x in parsed] if isinstance(parsed, list) else None


def _substitute_args(instructions: list[Instruction], text: str) -> str:
    """``text`` with ``${NAME}`` / ``$NAME`` replaced by the Dockerfile's ARG defaults."""
    args = {}
    for ins in instructions:
        if ins.keyword == "ARG" and "=" in ins.value:
            name, _, default = ins.value.partition("=")
            args[name.strip()] = default.strip()
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def dockerfile_stages(instructions: list[Instruction]) -> list[tuple[str, list[Instruction]]]:
    """(resolved base image, instructions) per stage; ARG defaults before the first FROM apply."""
    args: dict[str, str] = {}
    stages: list[tuple[str, list[Instruction]]] = []
    for ins in instructions:
        if ins.keyword == "ARG" and not stages:
            name, _, default = ins.value.partition("=")
            args[name.strip()] = default.strip()
        elif ins.keyword == "FROM":
            image = ins.value.split()[0]
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), ""), image)
            stages.append((image, []))
        elif stages:
            stages[-1][1].append(ins)
    return stages


def check_dockerfile(
    path: Path, *, base_prefix: str, torch_index: str | None, kensa: bool = True
) -> list[str]:
    """Base image, non-root user, healthcheck, the project installed, an entrypoint kensa has."""
    where = path.name
    stages = dockerfile_stages(parse_dockerfile(path))
    if not stages:
        return [f"{where}: no FROM"]
    problems: list[str] = []
    base, final = stages[-1]
    if not base.startswith(base_prefix):
        problems.append(f"{where}: the final stage is based on {base!r}; expected {base_prefix}…")
    python = re.search(
        r"python:?(3\.\d+)|(?:^|\s)python\s+install\s+(3\.\d+)",
        " ".join([base] + [i.value for _, stage in stages for i in stage if i.keyword == "RUN"]),
    )
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    if python:
        version = python.group(1) or python.group(2)
        if version != "3.11" and "<3.12" in requires:
            problems.append(f"{where}: Python {version}, but pyproject requires {requires}")
    users = [i.value for i in final if i.keyword == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append(f"{where}: the final stage runs as root; add a USER that is not root")
    health = [i.value for i in final if i.keyword == "HEALTHCHECK"]
    if not health or health[-1].upper().startswith("NONE"):
        problems.append(f"{where}: no HEALTHCHECK in the final stage")
    every = [i for _, stage in stages for i in stage]
    runs = _substitute_args(parse_dockerfile(path), " ".join(i.value for i in every if i.keyword == "RUN"))
    if torch_index and torch_index not in runs:
        problems.append(f"{where}: torch is not installed from {torch_index}")
    if not kensa:
        return problems
    copied = " ".join(i.value for i in every if i.keyword == "COPY")
    for needed in ["pyproject.toml", *project_packages()]:
        if not re.search(rf"(^|\s){re.escape(needed)}(\s|/|$)", copied):
            problems.append(f"{where}: {needed} is never copied into the image")
    if not re.search(r"pip install (--[\w-]+ )*\.(\s|$)", runs):
        problems.append(f"{where}: the project is never installed (`pip install .`)")
    if health and "/v2/health/" in health[-1]:
        url = re.search(r"(/v2/health/\w+)", health[-1])
        if url:
            problems += check_probe_path(url.group(1), f"{where} HEALTHCHECK")
    entry = next((_exec_form(i.value) for i in reversed(final) if i.keyword == "ENTRYPOINT"), None)
    cmd = next((_exec_form(i.value) for i in reversed(final) if i.keyword == "CMD"), None)
    if entry != ["kensa"]:
        problems.append(f'{where}: ENTRYPOINT should be ["kensa"] (exec form); got {entry}')
    problems += check_kensa_args(cmd or [], f"{where} CMD")
    envs = [i.value for i in final if i.keyword == "ENV"]
    names = re.findall(r"(KENSA_[A-Z_]+)=", " ".join(envs))
    problems += check_settings_names(names, f"{where} ENV")
    return problems
