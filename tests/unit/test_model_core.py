"""Train → evaluate → export on a tiny synthetic line, checked the way a QC lead and serving would."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from kensa.cli.main import app
from kensa.models.onnx.export import (
    ParityError,
    cpu_session,
    export_run,
    parity_sample_images,
    read_metadata,
    run_onnx,
)
from kensa.models.train.trainer import TrainConfig, load_checkpoint, train

runner = CliRunner()


def test_same_seed_same_metrics(tiny_line: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(model="mobilenet_v3_small", epochs=1, seed=3, fraction=0.5)
    a = train(tiny_line, cfg, tmp_path / "a", show_progress=False)
    b = train(tiny_line, cfg, tmp_path / "b", show_progress=False)
    assert a.best_validation_loss == b.best_validation_loss
    assert a.history == b.history
    sa = load_checkpoint(tmp_path / "a").model.state_dict()
    sb = load_checkpoint(tmp_path / "b").model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = train(
        tiny_line,
        TrainConfig(model="mobilenet_v3_small", epochs=1, seed=4, fraction=0.5),
        tmp_path / "c",
        show_progress=False,
    )
    assert c.history != a.history


def test_checkpoint_describes_itself(trained_run: Path, tiny_line: Path) -> None:
    loaded = load_checkpoint(trained_run)
    dataset = json.loads((tiny_line / ".kensa-dataset.json").read_text())
    assert loaded.model_name == "mobilenet_v3_small"
    assert loaded.classes == dataset["classes"]
    assert loaded.input_size == 64
    assert loaded.dataset_version == dataset["version"]
    assert loaded.config["epochs"] == 3 and loaded.config["seed"] == 0
    assert "best_validation_loss" in loaded.metrics


def test_evaluate_writes_the_qc_figures(trained_run: Path) -> None:
    metrics = json.loads((trained_run / "metrics.json").read_text())
    for key in ("escape_rate", "false_reject_rate", "automation_rate", "per_class_recall"):
        assert key in metrics
    n = metrics["n"]
    assert sum(metrics["verdict_counts"].values()) == n
    assert np.asarray(metrics["confusion_matrix"]).sum() == n
    assert set(metrics["slices"]) >= {"line", "camera", "variant"}
    assert sum(s["n"] for s in metrics["slices"]["camera"].values()) == n
    band = json.loads((trained_run / "band.json").read_text())
    # -1 / 2 are the "decide nothing automatically" sentinels when calibration data is too thin.
    assert band["t_ok"] <= band["t_defect"]
    assert band["t_ok"] == -1.0 or 0.0 <= band["t_ok"] <= 1.0
    assert band["guaranteed"] == (
        band["n_defective"] >= band["n_defective_needed"] and band["n_good"] >= band["n_good_needed"]
    )
    for png in ("confusion_matrix.png", "score_histograms.png", "escape_vs_automation.png"):
        assert (trained_run / "plots" / png).stat().st_size > 1000


def test_robustness_section_and_relative_ce(trained_run: Path, tmp_path: Path) -> None:
    from kensa.models.evaluation.corruptions import corruption_names
    from kensa.models.evaluation.evaluate_run import evaluate_run

    ref = evaluate_run(trained_run, corruptions=True, max_robustness_images=48, show_progress=False)
    rob = ref["robustness"]
    assert set(rob["per_corruption"]) == set(corruption_names()) and len(rob["per_corruption"]) >= 8
    assert all(len(s) == 5 for s in rob["per_corruption"].values())
    assert rob["mean_relative_ce"] is None  # no reference given
    assert (trained_run / "plots" / "robustness_error.png").is_file()
    # Relative CE as ImageNet-C defines it, against a reference whose error rises 0.1 per
    # severity step: rCE_c = sum_s(E_s,c - E_clean) / sum_s(0.1 s) = own summed gap / 1.5.
    names = list(rob["per_corruption"])
    ref_clean = {"error": 0.2}
    reference = {
        "model": "reference",
        "robustness": {
            "clean": ref_clean,
            "per_corruption": {n: {str(s): {"error": 0.2 + 0.1 * s} for s in range(1, 6)} for n in names},
        },
    }
    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    (ref_dir / "metrics.json").write_text(json.dumps(reference))
    again = evaluate_run(
        trained_run, corruptions=True, reference=ref_dir, max_robustness_images=48, show_progress=False
    )["robustness"]
    for n in names:
        own = sum(again["per_corruption"][n][str(s)]["error"] - again["clean"]["error"] for s in range(1, 6))
        assert again["relative_ce"][n] == pytest.approx(own / 1.5)
    assert again["reference"] == "reference"
    assert again["mean_relative_ce"] == pytest.approx(np.mean(list(again["relative_ce"].values())))


def test_export_parity_and_metadata_round_trip(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    result = export_run(trained_run, out)
    assert result.parity["passed"] and result.parity["n_images"] >= 256
    assert result.parity["max_abs_prob_diff"] <= 1e-4
    assert result.parity["verdict_agreement"] == 1.0
    proto = onnx.load(str(out))
    assert proto.opset_import[0].version >= 17
    inp = proto.graph.input[0]
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in proto.graph.output] == ["probs", "features"]
    meta = read_metadata(out)
    band = json.loads((trained_run / "band.json").read_text())
    loaded = load_checkpoint(trained_run)
    assert meta["classes"] == loaded.classes and meta["input_size"] == 64
    assert meta["thresholds"]["t_ok"] == band["t_ok"]
    assert meta["dataset_version"] == loaded.dataset_version
    assert meta["training_config"]["model"] == "mobilenet_v3_small"
    # The parity sample in the metadata reproduces from the file alone (what hot swap verifies).
    sess = cpu_session(out)
    got = run_onnx(sess, parity_sample_images(64))
    assert np.abs(got - np.asarray(meta["parity_sample"]["probs"])).max() < 1e-3
    # Dynamic batch and features of at most 32 dimensions.
    probs, feats = sess.run(None, {"images": np.zeros((5, 64, 64, 3), np.uint8)})
    assert probs.shape == (5, len(loaded.classes)) and 1 <= feats.shape[1] <= 32
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)


def test_variants_are_kept_only_within_tolerance(trained_run: Path, tmp_path: Path) -> None:
    result = export_run(trained_run, tmp_path / "m.onnx", fp16=True, int8=True)
    for name in ("fp16", "int8"):
        v = result.variants[name]
        assert Path(v["path"]).exists() == v["kept"]
        assert v["kept"] == (v["verdict_agreement"] >= 0.99 and v["escape_rate_delta"] <= 0.01)
    # A zero tolerance refuses any variant that changes a single verdict.
    strict = export_run(trained_run, tmp_path / "s.onnx", int8=True, variant_tolerance=0.0)
    v = strict.variants["int8"]
    assert v["kept"] == (v["verdict_agreement"] == 1.0 and v["escape_rate_delta"] <= 0.0)


def test_export_fails_loudly_when_parity_breaks(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import copy

    import kensa.models.onnx.export as export

    real_export = export.export_onnx_file

    def export_a_different_net(net, *args, **kwargs):  # type: ignore[no-untyped-def]
        # A graph whose head drifted from the PyTorch model: exactly what parity must catch.
        other = copy.deepcopy(net)
        with torch.no_grad():
            other.head[-1].bias.add_(torch.linspace(-2, 2, other.head[-1].bias.numel()))
        return real_export(other, *args, **kwargs)

    monkeypatch.setattr(export, "export_onnx_file", export_a_different_net)
    out = tmp_path / "x.onnx"
    with pytest.raises(ParityError, match="parity failed"):
        export_run(trained_run, out)
    assert not out.exists()
    assert json.loads(out.with_suffix(".parity.json").read_text())["passed"] is False


def test_export_without_band_names_the_missing_step(tiny_line: Path, tmp_path: Path) -> None:
    run = tmp_path / "raw"
    train(tiny_line, TrainConfig(model="tiny_cnn", epochs=1, fraction=0.3), run, show_progress=False)
    r = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "m.onnx")])
    assert r.exit_code == 2
    assert "kensa evaluate" in r.output


def test_cli_refuses_unknown_model_with_the_list(tiny_line: Path, tmp_path: Path) -> None:
    r = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(tiny_line),
            "--model",
            "gpt5",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert r.exit_code == 2
    assert "resnet18" in r.output and "gpt5" in r.output
    assert not (tmp_path / "r").exists()


def test_validation_is_carved_from_training_by_part_and_never_touches_calibration() -> None:
    from kensa.models.data.splits import SplitItem, carve_validation

    # 40 parts of two images each, two labels; a part's images must stay together.
    items = [
        SplitItem(f"p{p:02d}_{k}.png", "ok" if p % 4 else "defect_dent", f"sha{p}_{k}", part_id=f"p{p:02d}")
        for p in range(40)
        for k in range(2)
    ]
    held = carve_validation(items, 0.2, seed=0)
    assert held == carve_validation(list(reversed(items)), 0.2, seed=0)[::-1]  # order-free
    by_part: dict[str, set[bool]] = {}
    for item, h in zip(items, held, strict=True):
        by_part.setdefault(item.part_id or "", set()).add(h)
    assert all(len(v) == 1 for v in by_part.values())  # no part split across
    assert {i.label for i, h in zip(items, held, strict=True) if h} == {"ok", "defect_dent"}
    assert 0.1 <= sum(held) / len(items) <= 0.3
    assert not all(held) and held != carve_validation(items, 0.2, seed=1)
