"""The drift job on a real SQLite store: chains per camera, time windows, SPC, missing references."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from monitoring_helpers import CLASSES, MODEL, THRESHOLDS, Parts, log_parts, make_parts
from sqlalchemy import select, update

from kensa.monitoring.drift import CheckOptions, check_drift
from kensa.monitoring.features import build_table
from kensa.monitoring.reference import ReferenceProfile
from kensa.settings import Settings
from kensa.store.connect import open_store
from kensa.store.models import Alert, DriftResult, Prediction

OPTIONS = {"reports": False, "n_boot": 3000}


def _two_camera_reference(rng: np.random.Generator) -> ReferenceProfile:
    c1, c2 = make_parts(rng, 300), make_parts(rng, 300, shift={"brightness": 20.0})
    parts = Parts(
        c1.stats + c2.stats,
        np.concatenate([c1.probs, c2.probs]),
        np.concatenate([c1.embedding, c2.embedding]),
        np.concatenate([c1.labels, c2.labels]),
    )
    table = build_table(
        parts.stats,
        parts.probs,
        parts.embedding,
        CLASSES,
        cameras=["C1"] * 300 + ["C2"] * 300,
        labels=parts.labels,
    )
    return ReferenceProfile(table, MODEL[0], dict(THRESHOLDS), model_version=MODEL[1])


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path)


def test_each_camera_is_watched_against_its_own_reference(settings: Settings) -> None:
    rng = np.random.default_rng(0)
    ref = _two_camera_reference(rng)
    sessions = open_store(settings)
    log_parts(sessions, make_parts(rng, 400), camera="C1")
    log_parts(sessions, make_parts(rng, 400, shift={"brightness": 20.0}), camera="C2")
    opts = CheckOptions.from_settings(settings, **OPTIONS)
    clean = check_drift(sessions, settings, opts, references=lambda _n, _v: ref)
    # The cameras see differently lit parts; each against its own reference rows, both are quiet.
    assert [(g.group, g.levels) for g in clean.groups] == [
        ("L1/C1 (qc-test v1)", {"none": 5}),
        ("L1/C2 (qc-test v1)", {"none": 5}),
    ]
    log_parts(sessions, make_parts(rng, 200, shift={"brightness": 12.0}), camera="C1")  # C1's lamp
    log_parts(sessions, make_parts(rng, 200, shift={"brightness": 20.0}), camera="C2")
    shifted = check_drift(sessions, settings, opts, references=lambda _n, _v: ref)
    with sessions() as session:
        alerts = session.scalars(select(Alert)).all()
        assert [(a.kind, a.camera_id, a.level) for a in alerts] == [("drift", "C1", "critical")]
    assert shifted.groups[1].levels == {"none": 4}


def test_without_per_camera_reference_the_line_is_one_chain_and_no_reference_is_skipped(
    settings: Settings,
) -> None:
    rng = np.random.default_rng(1)
    ref = ReferenceProfile(make_parts(rng, 600).table(), MODEL[0], dict(THRESHOLDS), model_version=MODEL[1])
    sessions = open_store(settings)
    log_parts(sessions, make_parts(rng, 200), camera="C1")
    log_parts(sessions, make_parts(rng, 200), camera="C2")
    opts = CheckOptions.from_settings(settings, **OPTIONS)
    outcome = check_drift(sessions, settings, opts, references=lambda _n, _v: ref)
    assert [(g.group, g.windows) for g in outcome.groups] == [("L1/* (qc-test v1)", 5)]
    missing = check_drift(sessions, settings, opts, references=lambda _n, _v: None)
    assert missing.groups[0].skipped == "model qc-test v1 has no reference profile"
    assert missing.results == []


def test_time_windows_score_each_complete_hour_once(settings: Settings) -> None:
    rng = np.random.default_rng(2)
    ref = ReferenceProfile(make_parts(rng, 600).table(), MODEL[0], dict(THRESHOLDS), model_version=MODEL[1])
    sessions = open_store(settings)
    ids = log_parts(sessions, make_parts(rng, 300), camera=None)
    with sessions() as session:  # spread the parts over two past hours
        first = session.scalar(select(Prediction.created_at).where(Prediction.id == ids[0]))
        assert first is not None
        start = first.replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
        for i, pid in enumerate(ids):
            at = start + timedelta(hours=i // 150, seconds=i)
            session.execute(update(Prediction).where(Prediction.id == pid).values(created_at=at))
        session.commit()
    opts = CheckOptions.from_settings(settings, mode="time", window_s=3600.0, **OPTIONS)
    first_run = check_drift(sessions, settings, opts, references=lambda _n, _v: ref)
    assert first_run.groups[0].windows == 2
    with sessions() as session:
        sizes = session.scalars(select(DriftResult.window_size).order_by(DriftResult.id)).all()
        assert sizes == [150, 150]
    assert check_drift(sessions, settings, opts, references=lambda _n, _v: ref).results == []


def test_a_jump_in_the_defect_rate_raises_an_spc_alert(settings: Settings) -> None:
    rng = np.random.default_rng(3)
    ref = ReferenceProfile(
        make_parts(rng, 2000, defect_rate=0.1).table(), MODEL[0], dict(THRESHOLDS), model_version=MODEL[1]
    )
    sessions = open_store(settings)
    opts = CheckOptions.from_settings(settings, window=100, **OPTIONS)
    log_parts(sessions, make_parts(rng, 800, defect_rate=0.1), camera=None)
    assert check_drift(sessions, settings, opts, references=lambda _n, _v: ref).alerts == []
    log_parts(sessions, make_parts(rng, 200, defect_rate=0.45), camera=None)
    check_drift(sessions, settings, opts, references=lambda _n, _v: ref)
    with sessions() as session:
        spc = session.scalars(select(Alert).where(Alert.kind == "spc")).all()
    # More defective parts also means more borderline ones: both charts see it, each its own alert.
    assert sorted(a.details["key"] for a in spc) == ["spc:defect_rate", "spc:review_rate"]
    defect = next(a for a in spc if a.details["key"] == "spc:defect_rate")
    assert defect.level == "critical" and "beyond 3 sigma (high)" in defect.cause
    assert defect.cause.startswith("defect rate 2")  # 20-odd % against a centre near 7 %
