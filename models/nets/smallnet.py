"""A small plain CNN for small inputs: the zoo's cheapest rung, built for local defects.

Torchvision's mobile backbones downsample 32× and were tuned on ImageNet; trained from scratch on
a few thousand 64–128 px parts they stay near the "everything ok" prior on this line. Three
pooling stages keep defect-sized detail, and the global max pool lets one scratch-sized
activation decide, where an average would dilute it.
"""

from __future__ import annotations

import torch
from torch import nn


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class AvgMaxPool(nn.Module):
    """Concatenate global average and global max pooling: (B, C, H, W) → (B, 2C, 1, 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)], dim=1)


def small_cnn_backbone(width: int = 24) -> tuple[nn.Module, int]:
    """Backbone (B, 3, H, W) → (B, 16·width, 1, 1) and its embedding size."""
    w = width
    layers = nn.Sequential(
        _block(3, w),
        nn.MaxPool2d(2),
        _block(w, 2 * w),
        nn.MaxPool2d(2),
        _block(2 * w, 4 * w),
        nn.MaxPool2d(2),
        _block(4 * w, 8 * w),
        AvgMaxPool(),
    )
    return layers, 16 * w
