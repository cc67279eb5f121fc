"""What a finetune rung trains: frozen parts, learning-rate groups, BatchNorm modes, the cached-map forward.

``head``: the pretrained trunk (``stem``, ``low``, ``mid``) is frozen, its three maps cached; neck
          and head train.
``last``: ``stem`` and ``low`` are frozen, their stride-4 and stride-8 maps cached; ``mid`` (the
          stride-16 stages), neck and head train.
``all``:  everything trains from images (no cache); the trunk at a lower learning rate.
A from-scratch model is always ``all``, with one learning rate (its behaviour before the ladder).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kensa.models.nets.spatial import TappedBackbone
from kensa.models.nets.zoo import Finetune, QCNet

# Pretrained weights move at a tenth of the new layers' rate: the usual fine-tuning ratio, and
# enough that a few epochs adapt the trunk to the parts without erasing what ImageNet taught it.
BACKBONE_LR_SCALE = 0.1


def tapped(model: nn.Module) -> TappedBackbone | None:
    """The pretrained, tapped backbone of ``model``; None for a from-scratch model."""
    if isinstance(model, QCNet) and isinstance(model.backbone, TappedBackbone):
        return model.backbone
    return None


def cached_taps(finetune: Finetune) -> int:
    """How many maps a rung caches: 3 (stride 4, 8, 16) for head, 2 (stride 4, 8) for last, 0 for all."""
    return {"head": 3, "last": 2, "all": 0}[finetune]


def _trunk_parts(model: nn.Module, finetune: Finetune, frozen: bool) -> list[nn.Module]:
    bb = tapped(model)
    if bb is None:
        return []
    frozen_parts = {"head": [bb.stem, bb.low, bb.mid], "last": [bb.stem, bb.low], "all": []}[finetune]
    trained = {"head": [], "last": [bb.mid], "all": [bb.stem, bb.low, bb.mid]}[finetune]
    return frozen_parts if frozen else trained


def apply_finetune(model: nn.Module, finetune: Finetune) -> None:
    """Switch off gradients of the parts ``finetune`` freezes (all parameters stay in the state dict)."""
    for part in _trunk_parts(model, finetune, frozen=True):
        part.requires_grad_(False)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def set_train_mode(model: nn.Module) -> None:
    """``model.train()``, with the pretrained trunk's BatchNorm layers kept in eval mode.

    Their running statistics are ImageNet's: the cached maps were computed with them, and batches
    of 32 parts would give noisier ones. Their affine weights still learn where the part trains.
    Dropout and the new neck's BatchNorm train as usual.
    """
    model.train()
    bb = tapped(model)
    if bb is None:
        return
    for part in (bb.stem, bb.low, bb.mid):
        for m in part.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def param_groups(model: nn.Module, finetune: Finetune, lr: float) -> list[dict[str, Any]]:
    """Optimizer groups: trained trunk parts at ``lr * BACKBONE_LR_SCALE``, new layers at ``lr``.

    A from-scratch model gets one group of all its parameters (its optimizer as before).
    """
    bb = tapped(model)
    if bb is None:
        return [{"params": list(model.parameters()), "lr": lr}]
    trunk = [p for part in _trunk_parts(model, finetune, frozen=False) for p in part.parameters()]
    trunk_ids = {id(p) for p in trunk}
    new = [p for p in model.parameters() if p.requires_grad and id(p) not in trunk_ids]
    groups = [{"params": new, "lr": lr}]
    if trunk:
        groups.append({"params": trunk, "lr": lr * BACKBONE_LR_SCALE})
    return groups


def tap_channels(model: nn.Module, taps: int) -> tuple[int, ...]:
    """Channels of the first ``taps`` cached maps of a pretrained model: (C4, C8, C16)[:taps]."""
    bb = tapped(model)
    assert bb is not None
    t = bb.neck.taps
    return (t.c4, t.c8, t.c16)[:taps]


@torch.no_grad()
def trunk_maps(model: QCNet, images: torch.Tensor, taps: int) -> list[torch.Tensor]:
    """Frozen-trunk maps of uint8 images (B, 3, H, W), as float16 on the CPU, for the cache.

    taps=3: [(B, C4, H/4, W/4), (B, C8, H/8, W/8), (B, C16, H/16, W/16)]; taps=2: the first two.
    """
    bb = tapped(model)
    assert bb is not None and taps in (2, 3)
    device = model.mean.device
    f4 = bb.stem(model.normalise(images.to(device).float() / 255.0))
    f8 = bb.low(f4)
    maps = [f4, f8] if taps == 2 else [f4, f8, bb.mid(f8)]
    # float16 halves the cache (and its memory); the maps' ReLU6/BN ranges are far inside it.
    return [m.half().cpu() for m in maps]


class FromMaps(nn.Module):
    """The part of a pretrained model above its cached maps: maps → logits (B, classes).

    Its output equals ``model(x)`` for the image the maps came from, so the cached-map loop trains
    the very parameters the exported graph runs.
    """

    def __init__(self, model: QCNet) -> None:
        super().__init__()
        bb = tapped(model)
        assert bb is not None
        self.model = model
        self.backbone = bb

    def forward(self, f4: torch.Tensor, f8: torch.Tensor, f16: torch.Tensor | None = None) -> torch.Tensor:
        if f16 is None:
            f16 = self.backbone.mid(f8)  # finetune "last": (B, C16, H/16, W/16), trained
        return self.model.head(self.backbone.neck(f4, f8, f16))
