"""Behavioural model test: the default model (efficientnet_lite0, a head trained on its frozen
ImageNet maps) flags obvious defects and keeps its verdict under a mild lighting change (trains a
real model on 2 cores, so marked slow). From scratch, small_cnn needed two minutes for the same bar."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kensa.models.data.ingest import ingest_dataset, load_dataset
from kensa.models.line.synthetic import LineConditions, generate_dataset, iter_parts
from kensa.models.train.trainer import TrainConfig, load_checkpoint, predict_probs, split_tensors, train
from kensa.settings import Settings

SIZE = 64
N_PARTS = 1000
SEED = 11
EPOCHS = 20


@pytest.mark.slow
def test_small_model_learns_defects_and_keeps_verdict_under_mild_lighting(
    tmp_path: Path, settings: Settings
) -> None:
    torch.set_num_threads(2)
    root = tmp_path / "line"
    generate_dataset(root, n=N_PARTS, seed=SEED, image_size=SIZE)
    ingest_dataset(root, settings)
    cfg = TrainConfig(epochs=EPOCHS, seed=0, min_epochs=EPOCHS)  # the default: pretrained, head
    train(root, cfg, tmp_path / "run", show_progress=False)
    loaded = load_checkpoint(tmp_path / "run")
    ok = loaded.classes.index("ok")

    test = split_tensors(load_dataset(root), "test", SIZE)
    labels = test.labels.numpy()
    prior = float((labels == ok).mean())
    accuracy = float((predict_probs(loaded.model, test.images).argmax(1) == labels).mean())
    assert accuracy >= prior + 0.05, f"accuracy {accuracy:.3f} vs majority prior {prior:.3f}"

    # Held-out parts (a stream the model never saw): the same parts under nominal light and
    # under slightly dimmer light (the generator changes only the light between the two).
    def render(conditions: LineConditions) -> tuple[torch.Tensor, list[float | None]]:
        parts = list(iter_parts(400, SEED + 1000, conditions, SIZE))
        images = torch.stack(
            [torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1) for img, _ in parts]
        )
        return images, [rec.defect_severity for _, rec in parts]

    nominal, severity = render(LineConditions())
    dim, _ = render(LineConditions().with_overrides({"lighting": 0.9}))
    p_nominal = predict_probs(loaded.model, nominal)
    p_dim = predict_probs(loaded.model, dim)
    obvious = np.array([s is not None and s >= 0.7 for s in severity])
    assert obvious.sum() >= 15
    defect = np.array([s is not None for s in severity])
    flagged = float((p_nominal[obvious].argmax(1) != ok).mean())
    false_reject = float((p_nominal[~defect].argmax(1) != ok).mean())
    # The model tells obvious defects from good parts: it flags a large share of them while
    # rejecting few good parts (here: 72 % flagged at 5.5 % false rejects, accuracy 0.83 against a
    # 0.69 prior, at 64 px; small_cnn from scratch flagged 42-58 % at 0-3 %, so the bar is
    # discrimination, not recall).
    assert flagged >= 0.3, f"only {flagged:.0%} of {int(obvious.sum())} obvious defects flagged"
    assert flagged - false_reject >= 0.25, f"flagged {flagged:.0%} vs false rejects {false_reject:.0%}"
    # ok-vs-not-ok verdict kept under the mild lighting change on almost every part.
    kept = float(((p_nominal.argmax(1) == ok) == (p_dim.argmax(1) == ok)).mean())
    assert kept >= 0.9, f"verdict kept on only {kept:.0%} of parts under lighting 0.9"
