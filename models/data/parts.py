"""Torch datasets over a kensa dataset version: decoded once, kept as uint8, augmented per sample."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from kensa.models.data.imageprep import Preprocess, as_preprocess


def load_image(path: Path, recipe: Preprocess | int) -> torch.Tensor:
    """Decode an image file to a uint8 tensor (3, S, S) exactly as serving decodes a request.

    ``recipe`` is the model's :class:`Preprocess`; a bare size means the legacy square resize.
    """
    with Image.open(path) as opened:
        arr = as_preprocess(recipe).prepare(opened)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def train_augmentations() -> v2.Transform:
    """Augmentations that mimic honest line variation, not the corruption suite.

    Kept mild on purpose: robustness is *measured* under the corruption suite, so training on the
    same corruptions would hide exactly what the robustness report is for. Flips are exact on the
    pixel grid; no rotation or sub-pixel shift, whose resampling smears the few-pixel scratches and
    cracks that a 96-128 px model has to see. A mild brightness/contrast jitter covers honest
    lighting drift between shifts.
    """
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.ColorJitter(brightness=0.1, contrast=0.1),
        ]
    )


class PartImages(Dataset[tuple[torch.Tensor, int]]):
    """Images of one split as uint8 tensors held in memory; items are (float [0,1] CHW, label).

    Small-factory datasets (thousands of images at ≤ 256 px) fit in memory, and decoding once
    makes CPU training several times faster than decoding per epoch.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int],
        recipe: Preprocess | int,
        transform: v2.Transform | None = None,
    ) -> None:
        if len(paths) != len(labels):
            msg = f"{len(paths)} paths but {len(labels)} labels"
            raise ValueError(msg)
        self.preprocess = as_preprocess(recipe)
        self.image_size = self.preprocess.size
        self.labels = torch.tensor(list(labels), dtype=torch.long)
        size = self.image_size
        self.images = (
            torch.stack([load_image(p, self.preprocess) for p in paths])
            if paths
            else torch.empty(0, 3, size, size, dtype=torch.uint8)
        )
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.images[index]
        if self.transform is not None:
            img = self.transform(img)
        return img.float().div_(255.0), int(self.labels[index])
