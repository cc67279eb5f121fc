"""The model zoo: every rung builds, has the advertised size, and refuses unknown names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kensa.models.nets.zoo import UnknownModelError, build_model, count_parameters, model_names


@pytest.mark.parametrize("name", model_names())
def test_every_size_builds_for_the_dataset(name: str) -> None:
    model = build_model(name, num_classes=6).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
        emb = model.embed(x)
    assert logits.shape == (2, 6)
    assert emb.shape == (2, model.embedding_dim)


def test_ladder_spans_one_to_twenty_five_million_parameters() -> None:
    sizes = [count_parameters(build_model(n, 6)) for n in model_names()]
    assert sizes[0] < 2e6 and 20e6 < sizes[-1] < 30e6
    assert len(sizes) >= 4
    assert sizes[-1] == max(sizes)


def test_unknown_model_lists_known_ones() -> None:
    with pytest.raises(UnknownModelError) as err:
        build_model("vit_huge", 6)
    for name in model_names():
        assert name in str(err.value)


def test_local_weights_initialise_backbone_but_not_mismatched_head(tmp_path: Path) -> None:
    source = build_model("resnet18", num_classes=3)
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    target = build_model("resnet18", num_classes=6, weights=path)
    assert torch.equal(target.backbone[0].weight, source.backbone[0].weight)
    assert target.head.weight.shape == (6, 512)


def test_missing_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="never downloads"):
        build_model("resnet18", 6, weights=tmp_path / "nope.pt")
