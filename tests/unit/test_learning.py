"""Behavioural model test: a small trained model flags obvious defects and keeps its verdict
under a mild lighting change (trains a real model for about a minute, so marked slow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kensa.settings import Settings
from models.data import load_dataset
from models.synthetic import LineConditions, iter_parts
from models.train import TrainConfig, load_checkpoint, predict_probs, split_tensors, train
from tests.conftest import make_line

SIZE = 96
N_PARTS = 900
SEED = 11


@pytest.mark.slow
def test_small_model_learns_defects_and_keeps_verdict_under_mild_lighting(
    tmp_path: Path, settings: Settings
) -> None:
    torch.set_num_threads(2)
    root = make_line(tmp_path / "line", N_PARTS, SEED, SIZE, settings)
    cfg = TrainConfig(model="mobilenet_v3_small", epochs=EPOCHS, seed=0)
    train(root, cfg, tmp_path / "run", show_progress=False)
    loaded = load_checkpoint(tmp_path / "run")
    ok = loaded.classes.index("ok")

    test = split_tensors(load_dataset(root), "test", SIZE)
    labels = test.labels.numpy()
    prior = float((labels == ok).mean())
    accuracy = float((predict_probs(loaded.model, test.images).argmax(1) == labels).mean())
    assert accuracy >= prior + 0.08, f"accuracy {accuracy:.3f} vs majority prior {prior:.3f}"

    # Held-out parts (a stream the model never saw), rendered under slightly dimmer light.
    dim = LineConditions().with_overrides({"lighting": 0.9})
    obvious = [
        torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
        for img, rec in iter_parts(400, SEED + 1000, dim, SIZE)
        if rec.defect_severity is not None and rec.defect_severity >= 0.7
    ]
    assert len(obvious) >= 15
    probs = predict_probs(loaded.model, torch.stack(obvious))
    flagged = float((probs.argmax(1) != ok).mean())
    assert flagged >= 0.7, f"only {flagged:.0%} of {len(obvious)} obvious defects flagged"
