"""Learning from good parts only: PatchCore on the shipped backbone, its band, its ONNX graph.

Fitted once per module on good parts of the synthetic line at 128 px (a small bank, so the
module costs seconds); judged on parts it never saw, defective ones with the line's own masks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from sklearn.metrics import roc_auc_score

from kensa.models.data.ingest import ingest_dataset
from kensa.models.evaluation.anomaly_band import NotEnoughCalibrationError, calibrate_anomaly_band
from kensa.models.evaluation.evaluate_anomaly import evaluate_anomaly_run
from kensa.models.evaluation.evaluate_run import BandPolicy
from kensa.models.line.synthetic import (
    DEFECT_TYPES,
    LineConditions,
    encode_png,
    generate_dataset,
    generate_part,
    iter_parts,
    part_seed,
)
from kensa.models.nets.patchcore import PatchCoreConfig, PatchCoreFit, fit_patchcore, score_images
from kensa.models.onnx.anomaly import export_anomaly_model, export_anomaly_run
from kensa.models.onnx.contract import read_metadata
from kensa.models.train.anomaly import fit_anomaly_run, is_anomaly_run
from kensa.monitoring.reference import build_reference
from kensa.settings import Settings

SIZE = 128


@pytest.fixture(scope="module")
def fitted() -> PatchCoreFit:
    good = [img for img, rec in iter_parts(120, 21, LineConditions(), SIZE) if rec.label == "ok"][:80]
    return fit_patchcore(torch.from_numpy(np.stack(good)), PatchCoreConfig(bank_size=1024))


@pytest.fixture(scope="module")
def unseen() -> tuple[np.ndarray, np.ndarray, list[np.ndarray | None]]:
    """50 good and 30 defective parts (6 of each defect type) from streams the fit never saw."""
    images, labels, masks = [], [], []
    for k in range(50):
        img, _ = generate_part(part_seed(99, k), LineConditions(), SIZE, "ok")
        images.append(img)
        labels.append(False)
        masks.append(None)
    for k in range(30):
        img, rec = generate_part(
            part_seed(98, k), LineConditions(), SIZE, DEFECT_TYPES[k % len(DEFECT_TYPES)]
        )
        images.append(img)
        labels.append(True)
        masks.append(rec.defect_mask)
    return np.stack(images), np.array(labels), masks


def test_fitted_on_good_parts_only_defective_parts_score_higher(fitted: PatchCoreFit, unseen: tuple) -> None:
    images, defective, _ = unseen
    scores, maps = score_images(fitted.net, torch.from_numpy(images))
    assert maps.shape == (len(images), SIZE, SIZE)
    assert roc_auc_score(defective, scores) > 0.8  # chance is 0.5
    # Normalised on good parts held out of the bank: a typical unseen good part scores about 0.5.
    assert 0.35 < float(np.median(scores[~defective])) < 0.65
    assert fitted.n_holdout_parts >= 1 and fitted.net.bank.shape[0] == 1024


def test_the_map_points_at_the_defect(fitted: PatchCoreFit, unseen: tuple) -> None:
    images, defective, masks = unseen
    _, maps = score_images(fitted.net, torch.from_numpy(images[defective]))
    hits = []
    for amap, mask in zip(maps, [m for m in masks if m is not None], strict=True):
        # A few pixels of slack: the map lives on a stride-8 patch grid, smoothed.
        near = mask.copy()
        for axis in (0, 1):
            for step in (-3, -2, -1, 1, 2, 3):
                near |= np.roll(mask, step, axis=axis)
        hits.append(bool(near[np.unravel_index(np.argmax(amap), amap.shape)]))
    assert np.mean(hits) >= 0.6, f"map peak on the defect for {np.mean(hits):.0%} of defective parts"


def test_good_only_band_certifies_false_rejects_and_says_escapes_are_not() -> None:
    rng = np.random.default_rng(0)
    good = rng.beta(5, 5, 300)
    band = calibrate_anomaly_band(good, np.zeros(300, bool), alpha=0.05, delta=0.1, max_false_reject=0.05)
    assert band.false_reject_guaranteed and not band.escape_guaranteed and not band.guaranteed
    assert "ESCAPE RATE NOT CERTIFIED" in band.message and "45 defective calibration parts" in band.message
    assert 0 <= band.t_ok <= band.t_defect <= 1
    fresh = rng.beta(5, 5, 20_000)  # the same line, parts the band never saw
    assert (fresh >= band.t_defect).mean() <= 0.05
    assert (fresh > band.t_ok).mean() <= 0.10 + 0.01


def test_good_only_calibration_too_small_is_refused_with_the_number_needed() -> None:
    with pytest.raises(NotEnoughCalibrationError, match="at least 45 are needed") as caught:
        calibrate_anomaly_band(np.linspace(0, 1, 30), np.zeros(30, bool), max_false_reject=0.05, delta=0.1)
    assert caught.value.need == 45 and caught.value.have == 30


def test_onnx_graph_carries_scores_maps_features_and_its_band(
    fitted: PatchCoreFit, unseen: tuple, tmp_path: Path
) -> None:
    images, defective, _ = unseen
    scores, _ = score_images(fitted.net, torch.from_numpy(images))
    band = calibrate_anomaly_band(scores[~defective], np.zeros(50, bool)).to_dict()
    report = export_anomaly_model(fitted.net, SIZE, band, tmp_path / "model.onnx", images)
    assert report["parity"]["passed"] and report["parity"]["verdict_agreement"] == 1.0
    meta = read_metadata(tmp_path / "model.onnx")
    assert meta["kind"] == "anomaly" and meta["input_size"] == SIZE
    assert meta["thresholds"]["t_defect"] == band["t_defect"]
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["probs", "features", "score", "anomaly_map"]
    probs, feats, score, amap = sess.run(None, {"images": images[:3]})
    assert score.shape == (3,) and amap.shape == (3, SIZE, SIZE) and feats.shape[0] == 3
    assert np.allclose(score, scores[:3], atol=1e-4)
    # The classifier's contract too: p(defect_anomaly) is the score, so the band reads it as is.
    assert probs.shape == (3, 2) and np.allclose(probs[:, 1], score) and np.allclose(probs.sum(1), 1)


def test_good_only_run_goes_from_ingest_to_an_exported_model(tmp_path: Path) -> None:
    data = tmp_path / "line"
    generate_dataset(data, n=400, seed=5, image_size=96)
    ds = ingest_dataset(data, Settings(data_dir=tmp_path / "home"), task="anomaly")
    assert {r.label for r in ds.split("train")} == {"ok"}
    run = tmp_path / "run"
    fit_anomaly_run(data, run, PatchCoreConfig(bank_size=512))
    assert is_anomaly_run(run)
    m = evaluate_anomaly_run(run, BandPolicy(alpha=0.05, delta=0.1, max_false_reject=0.05))
    assert m["kind"] == "anomaly" and m["band"]["false_reject_guaranteed"]
    # The line's defective parts never trained; they reached calibration (enough of them to
    # certify the escape rate as a classifier's band does) and test.
    cal_defective = m["band"]["n_defective"]
    assert cal_defective >= 45 and m["labels_support"]["escape_rate"] == "certified"
    assert m["n_defective"] > 0 and m["escape_rate"] is not None
    assert m["defect_auroc"] > 0.7 and m["pixel_auroc"] > 0.8
    report = export_anomaly_run(run, run / "model.onnx")
    assert report["parity"]["passed"]
    meta = read_metadata(run / "model.onnx")
    assert meta["kind"] == "anomaly" and meta["model_name"] == "patchcore"
    assert meta["band"]["t_defect"] == m["band"]["t_defect"] and meta["kensa.preprocess"]["size"] == 96
    # The drift monitor's reference comes from the same ONNX outputs as a classifier's.
    reference = build_reference(run / "model.onnx", data)
    assert reference.classes == ("ok", "defect_anomaly") and reference.model_name == "patchcore"
    assert reference.table.labels is not None and set(reference.table.labels.tolist()) == {0, 1}


def test_good_only_run_with_too_few_calibration_parts_is_refused_with_the_number(tmp_path: Path) -> None:
    data = tmp_path / "line"
    generate_dataset(data, n=120, seed=6, image_size=64)
    ingest_dataset(data, Settings(data_dir=tmp_path / "home"), task="anomaly")
    fit_anomaly_run(data, tmp_path / "run", PatchCoreConfig(bank_size=128))
    with pytest.raises(NotEnoughCalibrationError, match=r"at least 45 are needed"):
        evaluate_anomaly_run(tmp_path / "run", BandPolicy(alpha=0.05, delta=0.1, max_false_reject=0.05))


def test_cli_learns_from_good_parts_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder with only ok/ is an anomaly dataset; train, evaluate and export take it as it is."""
    from typer.testing import CliRunner

    from kensa.cli.common import get_settings
    from kensa.cli.main import app

    monkeypatch.setenv("KENSA_DATA_DIR", str(tmp_path / "home"))
    get_settings.cache_clear()
    root = tmp_path / "parts" / "ok"
    root.mkdir(parents=True)
    for k, (img, _) in enumerate(p for p in iter_parts(400, 8, LineConditions(), 64) if p[1].label == "ok"):
        (root / f"{k:04d}.png").write_bytes(encode_png(img))
    runner = CliRunner()
    ingest = runner.invoke(app, ["data", "ingest", str(tmp_path / "parts")])
    assert ingest.exit_code == 0 and "task: anomaly" in ingest.stdout, ingest.output
    run = tmp_path / "run"
    fitted = runner.invoke(
        app, ["train", "--data", str(tmp_path / "parts"), "--out", str(run), "--model", "patchcore"]
    )
    assert fitted.exit_code == 0 and "fitted patchcore on" in fitted.stdout, fitted.output
    evaluated = runner.invoke(app, ["evaluate", str(run), "--alpha", "0.05"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "ESCAPE RATE NOT CERTIFIED" in evaluated.stdout and "escape_rate: unknown" in evaluated.stdout
    exported = runner.invoke(app, ["export", str(run), "--out", str(run / "m.onnx")])
    assert exported.exit_code == 0 and "parity passed" in exported.stdout, exported.output
    refused = runner.invoke(app, ["export", str(run), "--out", str(run / "h.onnx"), "--fp16"])
    assert refused.exit_code == 2 and "FP32 only" in refused.stderr
    get_settings.cache_clear()


def test_patches_are_projected_before_the_bank_and_older_fits_still_load(
    fitted: PatchCoreFit, unseen: tuple, tmp_path: Path
) -> None:
    from kensa.models.train.anomaly import load_anomaly_run

    net = fitted.net
    taps = net.proj.shape[0]
    assert net.proj.shape == (taps, 64) and net.bank.shape == (1024, 64) and taps > 64
    # A fit from before projection (raw taps in the bank, no "proj") loads with the identity and
    # scores exactly as its graph did.
    data = tmp_path / "line"
    generate_dataset(data, n=120, seed=6, image_size=64)
    ingest_dataset(data, Settings(data_dir=tmp_path / "home"), task="anomaly")
    run = tmp_path / "run"
    fit_anomaly_run(data, run, PatchCoreConfig(bank_size=128, reduce_dim=None))
    payload = torch.load(run / "checkpoint.pt", weights_only=True)
    assert payload["shapes"]["proj"] == [taps, taps]
    before = score_images(load_anomaly_run(run).net, torch.from_numpy(unseen[0][:4, :64, :64].copy()))[0]
    del payload["state_dict"]["proj"], payload["shapes"]["proj"], payload["config"]["reduce_dim"]
    torch.save(payload, run / "checkpoint.pt")
    after = score_images(load_anomaly_run(run).net, torch.from_numpy(unseen[0][:4, :64, :64].copy()))[0]
    np.testing.assert_allclose(after, before, rtol=1e-6)
