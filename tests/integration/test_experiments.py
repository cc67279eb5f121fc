"""A data scientist's own models through the same gates: notebook API, `kensa register`, `compare`.

One embedded environment (MLflow on SQLite, the store) for the module: the custom CNN becomes
version 1, the torchvision ONNX file version 2, and the comparison puts them side by side.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import torchvision
from config_helpers import LENIENT_KPI
from mlflow.tracking import MlflowClient
from torch import nn
from typer.testing import CliRunner

import kensa
from kensa.cli.common import get_settings
from kensa.cli.main import app
from kensa.flows.experiment_record import ExperimentResult
from kensa.governance.approvals import Approval, ApprovalError, approve
from kensa.models.data.ingest import load_dataset
from kensa.models.nets.zoo import IMAGENET_MEAN, IMAGENET_STD
from kensa.registry import (
    ALIAS_CANDIDATE,
    ALIAS_CHAMPION,
    ONNX_FILE,
    TAG_COST,
    TAG_DATASET_VERSION,
    TAG_PARITY,
    TAG_REGISTERED_BY,
    TAG_SHA256,
    TAG_SOURCE,
    TAG_STATUS,
    TAG_THRESHOLDS,
)
from kensa.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REGISTRY = "qc-exp"
LENIENT = f"""
name = "{REGISTRY}"
{LENIENT_KPI}max_relative_ce = 1000
[sweep]
max_robustness_images = 16
"""
runner = CliRunner()


class TinyCNN(nn.Module):
    """A data scientist's own network, nothing from kensa's zoo: three convs and a linear head."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A user's environment: data dir and project config from KENSA_* variables, for API and CLI."""
    root = tmp_path_factory.mktemp("experiments")
    config = root / "kensa.toml"
    config.write_text(LENIENT)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KENSA_DATA_DIR", str(root / "kensa"))
        mp.setenv("KENSA_PROJECT_CONFIG", str(config))
        get_settings.cache_clear()
        yield Settings()
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def trained(tiny_line: Path) -> tuple[nn.Module, kensa.ExperimentData]:
    """The notebook part: open the dataset version, train a few seconds, outside kensa."""
    data = kensa.open_dataset(tiny_line)
    torch.manual_seed(0)
    model = TinyCNN(len(data.classes))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(data.train(), batch_size=32, shuffle=True)
    for _ in range(2):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model, data


@pytest.fixture(scope="module")
def experiment(env: Settings, trained: tuple[nn.Module, kensa.ExperimentData]) -> ExperimentResult:
    model, data = trained
    return kensa.log_experiment(
        model,
        dataset=data,
        name="tiny-cnn",
        params={"epochs": 2, "lr": 3e-3, "optimizer": "adam"},
        registered_by="dana",
        settings=env,
        show_progress=False,
    )


@pytest.fixture(scope="module")
def champion(env: Settings, experiment: ExperimentResult) -> str:
    """The custom CNN in service (approved in the first test; approved here if that did not run)."""
    aliases = MlflowClient().get_registered_model(REGISTRY).aliases
    if ALIAS_CHAMPION not in aliases:
        assert experiment.model_version is not None
        approve(
            REGISTRY,
            experiment.model_version,
            by="omar",
            role="operator",
            reason="setup",
            policy=Approval(),
            settings=env,
        )
    return str(MlflowClient().get_registered_model(REGISTRY).aliases[ALIAS_CHAMPION])


@pytest.fixture(scope="module")
def onnx_version(
    env: Settings, tiny_line: Path, tmp_path_factory: pytest.TempPathFactory, champion: str
) -> str:
    """Another tool's model: a torchvision network, float NCHW 1×3×64×64, plain torch.onnx.export."""
    path = tmp_path_factory.mktemp("onnx") / "squeezenet.onnx"
    net = torchvision_net(len(load_dataset(tiny_line).classes))
    torch.onnx.export(
        net.eval(),
        (torch.rand(1, 3, 64, 64),),
        str(path),
        dynamo=False,
        input_names=["input"],
        output_names=["logits"],
    )
    r = runner.invoke(
        app, ["register", str(path), "--data", str(tiny_line), "--by", "dana", "--name", "squeezenet"]
    )
    assert r.exit_code == 0, r.output
    assert "candidate" in r.output and "float32 NCHW input 'input' [1×3×64×64]" in r.output
    version = str(MlflowClient().get_model_version_by_alias(REGISTRY, ALIAS_CANDIDATE).version)
    assert f"version {version}" in r.output
    return version


def torchvision_net(classes: int) -> nn.Module:
    # SqueezeNet rather than MobileNetV3: a freshly initialised MobileNetV3 gives the same
    # probabilities for every image, which would let a wrapper that forgot the normalisation pass.
    torch.manual_seed(0)
    return torchvision.models.squeezenet1_1(num_classes=classes).eval()


def _download(version: str, into: Path) -> Path:
    local = mlflow.artifacts.download_artifacts(f"models:/{REGISTRY}/{version}", dst_path=str(into))
    return Path(local) / ONNX_FILE


def test_own_module_is_judged_registered_and_approved_by_another_person(
    env: Settings,
    trained: tuple[nn.Module, kensa.ExperimentData],
    experiment: ExperimentResult,
    tiny_line: Path,
    tmp_path: Path,
) -> None:
    from kensa.serving.inference.engine import load_model

    model, _ = trained
    assert model.training  # the caller's model was evaluated as a copy, not switched to eval
    assert experiment.passed and experiment.model_version is not None, experiment.summary()
    client = MlflowClient()
    mv = client.get_model_version_by_alias(REGISTRY, ALIAS_CANDIDATE)
    version = str(mv.version)
    assert version == experiment.model_version
    # The same version tags a flow-made candidate carries.
    assert mv.tags[TAG_SOURCE] == "experiment" and mv.tags[TAG_REGISTERED_BY] == "dana"
    assert mv.tags[TAG_DATASET_VERSION] == load_dataset(tiny_line).version
    thresholds = json.loads(mv.tags[TAG_THRESHOLDS])
    assert (thresholds["t_ok"], thresholds["t_defect"]) == (
        experiment.band["t_ok"],
        experiment.band["t_defect"],
    )
    parity = json.loads(mv.tags[TAG_PARITY])
    assert parity["passed"] and parity["max_abs_prob_diff"] <= 1e-4 and parity["verdict_agreement"] == 1.0
    assert json.loads(mv.tags[TAG_COST])["serving_per_million"] > 0
    # The MLflow run holds the evidence under the flows' names.
    run = client.get_run(experiment.run_id)
    assert run.data.tags["kensa.gate"] == "passed" and run.data.params["optimizer"] == "adam"
    for key in (
        "test.escape_rate",
        "test.false_reject_rate",
        "robustness.corrupted_escape_rate",
        "latency_ms_per_image",
        "parity_max_abs_diff",
    ):
        assert key in run.data.metrics
    logged = {a.path for a in client.list_artifacts(experiment.run_id)}
    assert {"metrics.json", "band.json", "parity.json", "kpi_gate.json", "plots", "onnx"} <= logged
    # Serving's own verification (hash, signature, parity sample) accepts the registered file.
    served = load_model(
        _download(version, tmp_path),
        name=REGISTRY,
        version=version,
        expected_sha256=mv.tags[TAG_SHA256],
        max_batch=4,
    )
    assert served.spec.classes == tuple(load_dataset(tiny_line).classes)

    policy = Approval()
    with pytest.raises(ApprovalError, match="two-person"):
        approve(REGISTRY, version, by="dana", role="admin", reason="mine", policy=policy, settings=env)
    approve(
        REGISTRY,
        mv.version,
        by="omar",
        role="operator",
        reason="beats the line KPI",
        policy=policy,
        settings=env,
    )
    champion = client.get_model_version_by_alias(REGISTRY, ALIAS_CHAMPION)
    assert str(champion.version) == version and champion.tags[TAG_STATUS] == "approved"


def test_torchvision_onnx_is_wrapped_with_normalisation_inside_and_registered(
    env: Settings, onnx_version: str, champion: str, tiny_line: Path, tmp_path: Path
) -> None:
    import onnx

    from kensa.models.onnx.export import cpu_session, run_onnx

    client = MlflowClient()
    mv = client.get_model_version(REGISTRY, onnx_version)
    assert mv.tags[TAG_SOURCE] == "register" and json.loads(mv.tags[TAG_PARITY])["passed"]
    # Relative corruption error was measured against the model in service, on the same parts.
    assert client.get_run(mv.run_id).data.tags["kensa.reference"] == f"{REGISTRY}/{champion}"
    path = _download(onnx_version, tmp_path)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["images"]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in graph.output] == ["probs", "features"]
    # The MLflow signature states the same contract: uint8 NHWC in, float32 per-class probs out.
    signature = mlflow.models.get_model_info(f"models:/{REGISTRY}/{onnx_version}").signature
    assert signature is not None
    [images_spec] = signature.inputs.inputs
    size = graph.input[0].type.tensor_type.shape.dim[1].dim_value
    assert (images_spec.name, images_spec.type, images_spec.shape) == (
        "images",
        np.dtype("uint8"),
        (-1, size, size, 3),
    )
    outputs = {o.name: (o.type, o.shape[0]) for o in signature.outputs.inputs}
    assert outputs == {"probs": (np.dtype("float32"), -1), "features": (np.dtype("float32"), -1)}
    assert signature.outputs.inputs[0].shape == (-1, len(load_dataset(tiny_line).classes))
    # Raw uint8 NHWC pixels in; what the torchvision model gives for ImageNet-normalised float NCHW.
    ds = load_dataset(tiny_line)
    net = torchvision_net(len(ds.classes))
    from kensa.models.train.trainer import split_tensors

    images = split_tensors(ds, "test", 64).images[:16]
    got = run_onnx(cpu_session(path), images.permute(0, 2, 3, 1).contiguous().numpy())
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = torch.softmax(net((images.float() / 255 - mean) / std), 1).numpy()
        unnormalised = torch.softmax(net(images.float() / 255), 1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(got - unnormalised).max() > 1e-3  # the normalisation is really in the graph


def test_onnx_that_does_not_fit_is_refused_before_anything_is_logged(
    env: Settings, tiny_line: Path, tmp_path: Path, experiment: ExperimentResult
) -> None:
    ten = tmp_path / "ten_classes.onnx"
    torch.onnx.export(
        torchvision.models.mobilenet_v3_small(num_classes=10).eval(),
        (torch.rand(1, 3, 64, 64),),
        str(ten),
        dynamo=False,
        input_names=["input"],
        output_names=["logits"],
    )
    features_only = tmp_path / "backbone.onnx"
    backbone = torchvision.models.mobilenet_v3_small().features.eval()
    torch.onnx.export(
        backbone,
        (torch.rand(1, 3, 64, 64),),
        str(features_only),
        dynamo=False,
        input_names=["input"],
        output_names=["fmap"],
    )
    versions = len(MlflowClient().search_model_versions(f"name='{REGISTRY}'"))
    runs = len(mlflow.search_runs(search_all_experiments=True))
    r = runner.invoke(app, ["register", str(ten), "--data", str(tiny_line)])
    assert r.exit_code == 2, r.output
    assert "'logits' [1, 10]" in r.output and "the dataset has 6 classes" in r.output
    r = runner.invoke(app, ["register", str(features_only), "--data", str(tiny_line)])
    assert r.exit_code == 2, r.output
    assert "no output gives one score per class" in r.output and "'fmap' [1, 576, 2, 2]" in r.output
    r = runner.invoke(app, ["register", str(tmp_path / "weights.pt"), "--data", str(tiny_line)])
    assert r.exit_code == 2 and "does not exist" in r.output
    assert len(MlflowClient().search_model_versions(f"name='{REGISTRY}'")) == versions
    assert len(mlflow.search_runs(search_all_experiments=True)) == runs


def test_compare_prints_the_table_and_plots_the_two_versions(
    env: Settings, experiment: ExperimentResult, onnx_version: str, tmp_path: Path
) -> None:
    v1 = experiment.model_version
    assert v1 is not None
    r = runner.invoke(app, ["compare", v1, onnx_version, "--out", str(tmp_path), "--max-images", "16"])
    assert r.exit_code == 0, r.output
    for row in (
        "escape rate",
        "false reject rate",
        "automation rate",
        "relative CE",
        "latency ms/image",
        "cost per million parts (USD)",
    ):
        assert row in r.output
    assert f"v{v1} tiny-cnn (64px)" in r.output and f"v{onnx_version} squeezenet (64px)" in r.output
    stem = f"compare_{REGISTRY}_v{v1}_v{onnx_version}"
    assert (tmp_path / f"{stem}.png").stat().st_size > 20_000
    report = json.loads((tmp_path / f"{stem}.json").read_text())
    first, second = report["rows"]
    assert first["latency_ms_per_image"] > 0 and second["cost_per_million"] > 0
    # Same test parts, same governed band: the registered file reproduces the logged evaluation.
    for key in ("escape_rate", "false_reject_rate", "automation_rate"):
        assert first[key] == pytest.approx(experiment.metrics[key])
    r = runner.invoke(app, ["compare", v1, "99", "--out", str(tmp_path)])
    assert r.exit_code == 2 and f"{REGISTRY} has no version '99'" in r.output


def test_experiment_that_misses_the_kpi_stays_visible_and_gets_no_alias(
    env: Settings,
    trained: tuple[nn.Module, kensa.ExperimentData],
    experiment: ExperimentResult,
    tmp_path: Path,
) -> None:
    strict = tmp_path / "strict.toml"
    # α = 0.01 % needs ~23,000 defective calibration parts to certify: unreachable on a tiny line.
    strict.write_text(LENIENT.replace("max_escape_rate = 0.99", "max_escape_rate = 0.0001"))
    client = MlflowClient()
    before = _aliases(client)
    n_versions = len(client.search_model_versions(f"name='{REGISTRY}'"))
    model, data = trained
    result = kensa.log_experiment(
        model,
        dataset=data,
        name="tiny-cnn-strict",
        registered_by="dana",
        config=strict,
        settings=env,
        show_progress=False,
    )
    assert not result.passed and result.model_version is None
    assert any("review band not certified" in reason for reason in result.reasons)
    run = client.get_run(result.run_id)
    assert run.data.tags["kensa.gate"] == "failed"
    assert "review band not certified" in run.data.tags["kensa.gate.message"]
    assert "test.escape_rate" in run.data.metrics  # the evidence is there to read
    assert len(client.search_model_versions(f"name='{REGISTRY}'")) == n_versions
    assert _aliases(client) == before


def _aliases(client: MlflowClient) -> dict[str, str | None]:
    return {
        alias: client.get_registered_model(REGISTRY).aliases.get(alias)
        for alias in (ALIAS_CANDIDATE, ALIAS_CHAMPION)
    }


def test_recalibrate_registers_new_thresholds_on_the_same_graph_for_approval(
    env: Settings, experiment: ExperimentResult, tmp_path: Path
) -> None:
    """New parts from the line (another seed, the lamp dimmed) set a new band; nothing is refitted."""
    import onnx
    from sqlalchemy import select

    from kensa.models.data.ingest import ingest_dataset
    from kensa.models.line.synthetic import LineConditions, generate_dataset
    from kensa.models.onnx.contract import read_metadata
    from kensa.store.audit import verify_chain
    from kensa.store.connect import open_store
    from kensa.store.models import AuditEvent

    v1 = experiment.model_version
    assert v1 is not None
    newer = tmp_path / "newer"
    generate_dataset(newer, n=360, seed=23, image_size=64, conditions=LineConditions(lighting=0.8))
    ingest_dataset(newer, env)
    client = MlflowClient()
    before = len(client.search_model_versions(f"name='{REGISTRY}'"))
    args = ["--data", str(newer), "--by", "kim", "--reason", "lamp replaced"]
    r = runner.invoke(app, ["recalibrate", v1, *args])
    assert r.exit_code == 0, r.output
    assert "(same graph)" in r.output and "approve with: kensa approve" in r.output
    new = client.get_model_version_by_alias(REGISTRY, ALIAS_CANDIDATE)
    assert int(new.version) == before + 1
    assert new.tags["kensa.recalibrated_from"] == v1 and new.tags[TAG_REGISTERED_BY] == "kim"
    # Trained on the old parts, calibrated on the new: both versions are on record.
    assert new.tags[TAG_DATASET_VERSION] == client.get_model_version(REGISTRY, v1).tags[TAG_DATASET_VERSION]
    old_file, new_file = _download(v1, tmp_path / "old"), _download(new.version, tmp_path / "new")
    old_graph, new_graph = onnx.load(str(old_file)).graph, onnx.load(str(new_file)).graph
    assert old_graph.SerializeToString() == new_graph.SerializeToString()  # no refit: same weights
    old_meta, new_meta = read_metadata(old_file), read_metadata(new_file)
    assert new_meta["recalibrated_from"]["version"] == v1
    assert new_meta["recalibrated_from"]["reason"] == "lamp replaced"
    assert new_meta["calibrated_on_dataset_version"] == load_dataset(newer).version
    assert new_meta["thresholds"] != old_meta["thresholds"]  # calibrated on the new parts
    assert json.loads(new.tags[TAG_THRESHOLDS]) == new_meta["thresholds"]  # what serving will read
    assert new.tags[TAG_STATUS] == "candidate"
    assert client.get_registered_model(REGISTRY).aliases.get(ALIAS_CHAMPION) != new.version
    with open_store(env)() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.action == "model.recalibrate")).all()
        assert verify_chain(session) == []
    (event,) = events
    assert event.actor == "kim" and event.subject.endswith(f"/{new.version}")
    # Bad input: an unknown version, and a reason left empty, change nothing.
    r = runner.invoke(app, ["recalibrate", "99", "--by", "kim", "--reason", "x"])
    assert r.exit_code == 2 and f"{REGISTRY} has no version '99'" in r.output
    r = runner.invoke(app, ["recalibrate", v1, "--by", "kim", "--reason", " "])
    assert r.exit_code == 2 and "needs a reason" in r.output
    assert len(client.search_model_versions(f"name='{REGISTRY}'")) == before + 1
