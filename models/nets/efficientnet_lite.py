"""EfficientNet-Lite0 as a plain module whose state-dict keys are those of the shipped ImageNet file.

Lite0 is EfficientNet-B0 made for integer accelerators: no squeeze-excitation, ReLU6 instead of
swish, stem (32) and head (1280) channels fixed. Google trained it in TensorFlow, so convolutions
use TF "SAME" padding: for a stride-2 convolution on an even side the padding is asymmetric (one
more row/column at the bottom/right), which ``nn.Conv2d(padding=k // 2)`` would get wrong by a
pixel at every downsampling. Stride-2 convolutions get an explicit ``F.pad`` whose amounts are
plain ints computed from the input size, so the ONNX graph has 5 constant-amount ``Pad`` nodes and
static shapes; stride-1 "SAME" is symmetric and left to the convolution.

Key names follow EfficientNet-PyTorch (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``...),
the layout of ``efficientnet-lite0-57934424.pth``, so the file loads with ``strict=True`` as is.
Inputs are expected normalised with mean = std = 0.5 per channel (``x * 2 - 1`` for x in [0, 1]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# TensorFlow's BatchNorm epsilon; PyTorch's default 1e-5 shifts every activation slightly.
BN_EPS = 1e-3
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000


@dataclass(frozen=True)
class StageArgs:
    """One stage of MBConv blocks: expansion ratio, depthwise kernel, first stride, width, depth."""

    expand: int
    kernel: int
    stride: int
    out: int
    repeats: int


# EfficientNet-B0's stages (Lite0 keeps them). Output stride after each stage: 2, 4, 8, 16, 16, 32, 32.
STAGES: tuple[StageArgs, ...] = (
    StageArgs(1, 3, 1, 16, 1),
    StageArgs(6, 3, 2, 24, 2),
    StageArgs(6, 5, 2, 40, 2),
    StageArgs(6, 3, 2, 80, 3),
    StageArgs(6, 5, 1, 112, 3),
    StageArgs(6, 5, 2, 192, 4),
    StageArgs(6, 3, 1, 320, 1),
)
STAGE_CHANNELS: tuple[int, ...] = tuple(s.out for s in STAGES)
STAGE_STRIDES: tuple[int, ...] = (2, 4, 8, 16, 16, 32, 32)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) for one spatial side of ``size`` pixels."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """A bias-free ``nn.Conv2d`` with TF "SAME" padding.

    At stride 1 (odd kernel) "SAME" is symmetric, (k - 1) / 2 a side, whatever the input size, so
    the convolution pads itself. At stride 2 it depends on the input size (for an even side: one
    more at the bottom/right), so an explicit ``F.pad`` runs first.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        symmetric = stride == 1
        padding = (kernel - 1) // 2 if symmetric else 0
        super().__init__(cin, cout, kernel, stride=stride, padding=padding, groups=groups, bias=False)
        self.explicit_pad = not symmetric

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.explicit_pad:
            k, s = self.kernel_size[0], self.stride[0]
            # int(): the amounts are Python constants, also while tracing for ONNX (static Pad node).
            top, bottom = same_padding(int(x.shape[-2]), k, s)
            left, right = same_padding(int(x.shape[-1]), k, s)
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConvLite(nn.Module):
    """Inverted residual without squeeze-excitation: 1x1 expand, kxk depthwise, 1x1 project."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        # Identity placeholders have no parameters, so the state dict keeps the file's key set.
        self._expand_conv: nn.Module = (
            nn.Conv2d(cin, mid, 1, bias=False) if self.has_expand else nn.Identity()
        )
        self._bn0: nn.Module = _bn(mid) if self.has_expand else nn.Identity()
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.act = nn.ReLU6()
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x  # (B, cin, H, W)
        if self.has_expand:
            y = self.act(self._bn0(self._expand_conv(y)))  # (B, cin * expand, H, W)
        y = self.act(self._bn1(self._depthwise_conv(y)))  # (B, mid, ceil(H / s), ceil(W / s))
        y = self._bn2(self._project_conv(y))  # (B, cout, H', W'): linear bottleneck, no activation
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 for 1000 ImageNet classes; 4,652,008 parameters.

    ``forward`` takes normalised images (B, 3, H, W) (mean = std = 0.5) and returns logits
    (B, 1000); ``features`` returns the maps after chosen stages, for spatial heads and PatchCore;
    ``embed`` returns the pooled 1280-d embedding the classifier head reads.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks: list[nn.Module] = []
        stage_ends: list[int] = []  # index of the last block of each stage
        cin = STEM_CHANNELS
        for stage in STAGES:
            for i in range(stage.repeats):
                blocks.append(
                    MBConvLite(cin, stage.out, stage.expand, stage.kernel, stage.stride if i == 0 else 1)
                )
                cin = stage.out
            stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self.stage_ends: tuple[int, ...] = tuple(stage_ends)
        self._conv_head = nn.Conv2d(cin, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self.act = nn.ReLU6()
        self._dropout = nn.Dropout(dropout)
        self._fc: nn.Module = nn.Linear(HEAD_CHANNELS, num_classes)  # nn.Identity() to cut it off

    def features(self, x: torch.Tensor, stages: tuple[int, ...] = (2, 4)) -> list[torch.Tensor]:
        """Feature maps after each stage in ``stages`` (0-6), in order; blocks past the last are skipped.

        At 224 px: stage 2 gives (B, 40, 28, 28) at stride 8, stage 4 (B, 112, 14, 14) at stride 16.
        """
        if not stages or list(stages) != sorted(set(stages)) or not 0 <= stages[0] <= stages[-1] < 7:
            msg = f"stages must be increasing indices in 0..6 (e.g. (2, 4)), got {stages}"
            raise ValueError(msg)
        wanted = {self.stage_ends[s] for s in stages}
        last = self.stage_ends[stages[-1]]
        out: list[torch.Tensor] = []
        x = self.act(self._bn0(self._conv_stem(x)))  # (B, 32, H/2, W/2)
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in wanted:
                out.append(x)
            if i == last:
                break
        return out

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map before pooling: (B, 1280, H/32, W/32)."""
        x = self.act(self._bn0(self._conv_stem(x)))  # (B, 32, H/2, W/2)
        for block in self._blocks:
            x = block(x)  # ends at (B, 320, H/32, W/32)
        return self.act(self._bn1(self._conv_head(x)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding (B, 1280)."""
        return self.forward_trunk(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(self.embed(x)))  # (B, num_classes)
