"""The fine-tuning ladder: pretrained rungs build and freeze what they say, cached maps are reused and
keyed right, a head trained on cached maps is the model that is checkpointed and exported, and a
fine-tuned pretrained backbone beats a from-scratch CNN on the same data and epochs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kensa.cli.main import app
from kensa.flows.config import ConfigError, parse_project_config
from kensa.models.data.ingest import ingest_dataset, load_dataset
from kensa.models.evaluation.evaluate_run import BandPolicy, evaluate_run
from kensa.models.line.synthetic import LineConditions, generate_dataset
from kensa.models.nets.backbones import CATALOGUE
from kensa.models.nets.spatial import TappedBackbone
from kensa.models.nets.zoo import QCNet, build_model, count_parameters
from kensa.models.onnx.export import cpu_session, export_run, read_metadata
from kensa.models.train.finetune import (
    BACKBONE_LR_SCALE,
    FromMaps,
    apply_finetune,
    param_groups,
    trainable_parameters,
    trunk_maps,
)
from kensa.models.train.trainer import (
    TrainConfig,
    TrainResult,
    load_checkpoint,
    predict_probs,
    record_tensors,
    train,
    training_and_validation,
)
from kensa.settings import Settings

PRETRAINED = ("efficientnet_lite0", "mobilenet_v2")
runner = CliRunner()


def _tapped(model: QCNet) -> TappedBackbone:
    assert isinstance(model.backbone, TappedBackbone)
    return model.backbone


@pytest.mark.parametrize("name", PRETRAINED)
def test_pretrained_rung_builds_with_its_normalisation_and_weights(name: str) -> None:
    model = build_model(name, num_classes=6).eval()
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        logits, emb = model(x), model.embed(x)
    assert logits.shape == (2, 6)
    assert emb.shape == (2, model.embedding_dim) == (2, 192)
    backbone = CATALOGUE[name]
    # The normalisation the weights expect rides in the module (and so in the ONNX graph).
    assert torch.allclose(model.mean.flatten(), torch.tensor(backbone.mean))
    assert torch.allclose(model.std.flatten(), torch.tensor(backbone.std))
    assert model.provenance is not None and model.provenance["sha256"] == backbone.sha256
    # Pretrained, not random: the trunk's first conv equals the shipped file's, a fresh build's does not.
    fresh = build_model(name, 6, pretrained=False)
    stem_w = next(_tapped(model).stem.parameters())
    assert not torch.equal(stem_w, next(_tapped(fresh).stem.parameters()))
    assert torch.equal(stem_w, next(_tapped(build_model(name, 6)).stem.parameters()))


@pytest.mark.parametrize("name", PRETRAINED)
def test_each_rung_freezes_what_it_says(name: str) -> None:
    counts = {}
    for finetune in ("head", "last", "all"):
        model = build_model(name, 6)
        apply_finetune(model, finetune)  # type: ignore[arg-type]
        counts[finetune] = trainable_parameters(model)
        groups = param_groups(model, finetune, 1e-3)  # type: ignore[arg-type]
        assert sum(p.numel() for g in groups for p in g["params"]) == counts[finetune]
        if finetune != "head":  # the pretrained stages that train move at a lower rate
            assert groups[1]["lr"] == pytest.approx(1e-3 * BACKBONE_LR_SCALE)
    bb = _tapped(build_model(name, 6))
    neck_and_head = count_parameters(bb.neck) + (6 * 192 + 6)
    assert counts["head"] == neck_and_head
    assert counts["last"] == neck_and_head + count_parameters(bb.mid)
    assert counts["all"] == count_parameters(build_model(name, 6))


def test_from_scratch_models_refuse_head_and_last() -> None:
    with pytest.raises(ValueError, match="from scratch.*efficientnet_lite0"):
        TrainConfig(model="small_cnn", finetune="head").validate()
    with pytest.raises(ValueError, match="head, last, all"):
        TrainConfig(model="efficientnet_lite0", finetune="full").validate()
    TrainConfig(model="small_cnn", finetune="all").validate()
    assert TrainConfig(model="small_cnn").resolved_finetune() == "all"
    assert TrainConfig(model="efficientnet_lite0").resolved_finetune() == "head"


def _head_run(data: Path, out: Path, cache: Path, **kw: object) -> TrainResult:
    fields: dict[str, object] = {"model": "efficientnet_lite0", "finetune": "head", "epochs": 1, "seed": 0}
    cfg = TrainConfig(**{**fields, **kw})  # type: ignore[arg-type]
    return train(data, cfg, out, show_progress=False, cache_dir=cache)


def test_feature_cache_is_reused_and_keyed_by_image_size(tiny_line: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = _head_run(tiny_line, tmp_path / "a", cache)
    assert first.feature_cache == "computed" and first.feature_seconds > 0
    [path] = list(cache.iterdir())
    written = path.stat().st_mtime_ns
    # Another trial on the same data (another seed and fraction) reads the same file.
    again = _head_run(tiny_line, tmp_path / "b", cache, seed=1, fraction=0.5)
    assert again.feature_cache == "hit"
    assert path.stat().st_mtime_ns == written and list(cache.iterdir()) == [path]
    # Another input size gives other maps: a second file, extracted anew.
    other = _head_run(tiny_line, tmp_path / "c", cache, image_size=48)
    assert other.feature_cache == "computed"
    assert len(list(cache.iterdir())) == 2


@pytest.fixture(scope="module")
def head_run(tmp_path_factory: pytest.TempPathFactory, tiny_line: Path) -> tuple[Path, TrainResult]:
    """A Lite0 head trained for 2 epochs on cached maps of the tiny line."""
    tmp = tmp_path_factory.mktemp("head")
    cfg = TrainConfig(model="efficientnet_lite0", finetune="head", epochs=2, seed=0)
    return tmp / "run", train(tiny_line, cfg, tmp / "run", show_progress=False, cache_dir=tmp / "cache")


def test_head_trained_on_cached_maps_is_the_checkpointed_model(
    head_run: tuple[Path, TrainResult], tiny_line: Path
) -> None:
    run, result = head_run
    loaded = load_checkpoint(run)
    assert loaded.config["finetune"] == "head"
    assert loaded.backbone is not None
    assert loaded.backbone["sha256"] == CATALOGUE["efficientnet_lite0"].sha256
    # The rebuilt model, run on images, reproduces the validation loss the trainer measured on
    # cached float16 maps: what trained is what was saved and what will be exported.
    ds = load_dataset(tiny_line)
    _, val = training_and_validation(ds, 0.15, 0)
    data = record_tensors(ds, val, TrainConfig().preprocess(64))
    probs = predict_probs(loaded.model, data.images)
    labels = data.labels.numpy()
    loss = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1)).mean())
    assert loss == pytest.approx(result.best_validation_loss, abs=2e-3)
    assert isinstance(loaded.model, QCNet)
    with torch.no_grad():
        via_maps = FromMaps(loaded.model)(*(m.float() for m in trunk_maps(loaded.model, data.images, 3)))
        via_image = loaded.model(data.images.float() / 255.0)
    assert torch.allclose(via_maps, via_image, atol=2e-2)


@pytest.mark.parametrize("finetune", ["last", "all"])
def test_deeper_rungs_train_their_stages_and_keep_imagenet_statistics(
    finetune: str, tiny_line: Path, tmp_path: Path
) -> None:
    cfg = TrainConfig(model="efficientnet_lite0", finetune=finetune, epochs=1, seed=0)
    result = train(tiny_line, cfg, tmp_path / finetune, show_progress=False, cache_dir=tmp_path / "cache")
    assert result.feature_cache == ("computed" if finetune == "last" else "off")
    trained = _tapped(load_checkpoint(tmp_path / finetune).model)  # type: ignore[arg-type]
    start = _tapped(build_model("efficientnet_lite0", 6))
    stem_same = all(
        torch.equal(a, b) for a, b in zip(trained.stem.parameters(), start.stem.parameters(), strict=True)
    )
    mid_same = all(
        torch.equal(a, b) for a, b in zip(trained.mid.parameters(), start.mid.parameters(), strict=True)
    )
    assert stem_same == (finetune == "last")  # "last" freezes the stem, "all" trains it
    assert not mid_same
    # The trunk's BatchNorm keeps ImageNet's running statistics; the new neck's learn the parts'.
    bn_trunk = [m for m in trained.mid.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    bn_start = [m for m in start.mid.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    assert bn_trunk.running_mean is not None and bn_start.running_mean is not None
    assert torch.equal(bn_trunk.running_mean, bn_start.running_mean)
    neck_bn = trained.neck.fuse[1]
    assert isinstance(neck_bn, torch.nn.BatchNorm2d) and neck_bn.running_mean is not None
    assert not torch.equal(neck_bn.running_mean, torch.zeros_like(neck_bn.running_mean))


def test_lite0_head_run_exports_with_parity_drift_features_and_provenance(
    head_run: tuple[Path, TrainResult], tmp_path: Path
) -> None:
    run, _ = head_run
    evaluate_run(run, show_progress=False)
    exported = export_run(run, tmp_path / "m.onnx", parity_images=64)
    assert exported.parity["passed"], exported.parity
    meta = read_metadata(exported.path)
    assert meta["backbone"]["name"] == "efficientnet_lite0"
    assert meta["backbone"]["sha256"] == CATALOGUE["efficientnet_lite0"].sha256
    assert meta["backbone"]["finetune"] == meta["training_config"]["finetune"] == "head"
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    probs, features = cpu_session(exported.path).run(["probs", "features"], {"images": images})
    assert probs.shape == (3, 6) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert features.shape == (3, meta["feature_dims"]) and meta["feature_dims"] > 1


def test_cli_trains_a_finetune_rung_and_refuses_one_from_scratch(tiny_line: Path, tmp_path: Path) -> None:
    from kensa.cli.common import get_settings

    env = {"KENSA_DATA_DIR": str(tmp_path / "kensa")}
    base = ["train", "--data", str(tiny_line), "--epochs", "1"]
    get_settings.cache_clear()  # one Settings per CLI process; this "process" has its own data dir
    r = runner.invoke(
        app,
        [*base, "--out", str(tmp_path / "r"), "--model", "efficientnet_lite0", "--finetune", "head"],
        env=env,
    )
    assert r.exit_code == 0, r.output
    assert "finetune head" in r.output
    assert len(list((tmp_path / "kensa" / "cache" / "features").iterdir())) == 1
    r = runner.invoke(
        app, [*base, "--out", str(tmp_path / "s"), "--model", "small_cnn", "--finetune", "head"], env=env
    )
    assert r.exit_code == 2
    assert "from scratch" in r.output and not (tmp_path / "s" / "checkpoint.pt").exists()
    get_settings.cache_clear()


def test_project_config_carries_the_rungs() -> None:
    cfg = parse_project_config(
        {
            "pilot": {"model": "efficientnet_lite0", "finetune": "last"},
            "sweep": {"finetunes": ["head", "all"]},
        }
    )
    assert cfg.pilot.finetune == "last"
    assert cfg.sweep.finetunes_for(pretrained=True) == ["head", "all"]
    assert cfg.sweep.finetunes_for(pretrained=False) == ["all"]
    assert parse_project_config({}).pilot.finetune is None
    with pytest.raises(ConfigError, match="pilot.finetune"):
        parse_project_config({"pilot": {"finetune": "everything"}})


DIRECTION_PARTS, DIRECTION_SIZE, DIRECTION_EPOCHS, DIRECTION_SEED = 1200, 64, 5, 21


@pytest.mark.slow
def test_pretrained_head_beats_small_cnn_from_scratch(tmp_path: Path, settings: Settings) -> None:
    # Same data, same epochs, each rung's default recipe (~45 s on 2 cores, most of it small_cnn).
    # Checked on line seeds 21-24: head accuracy +0.03..+0.06, automation +0.05..+0.31 over small_cnn.
    root = tmp_path / "line"
    generate_dataset(
        root, n=DIRECTION_PARTS, seed=DIRECTION_SEED, image_size=DIRECTION_SIZE, conditions=LineConditions()
    )
    ingest_dataset(root, settings)
    # A band the ~90 defective calibration parts of this small line can certify.
    policy = BandPolicy(alpha=0.1, delta=0.2, max_false_reject=0.1)
    metrics = {}
    for model in ("small_cnn", "efficientnet_lite0"):
        cfg = TrainConfig(model=model, epochs=DIRECTION_EPOCHS, seed=0)  # lite0: finetune "head"
        train(root, cfg, tmp_path / model, show_progress=False)
        metrics[model] = evaluate_run(tmp_path / model, policy=policy, show_progress=False)
    scratch, pretrained = metrics["small_cnn"], metrics["efficientnet_lite0"]
    summary = json.dumps(
        {m: {k: metrics[m][k] for k in ("accuracy", "automation_rate", "defect_auroc")} for m in metrics}
    )
    assert pretrained["band"]["guaranteed"], summary
    assert pretrained["accuracy"] > scratch["accuracy"], summary
    assert pretrained["automation_rate"] > scratch["automation_rate"], summary
    assert pretrained["defect_auroc"] > scratch["defect_auroc"] + 0.1, summary
