"""PatchCore: learn what good parts look like, patch by patch, and score how unlike them a part is.

Roth et al., "Towards Total Recall in Industrial Anomaly Detection" (CVPR 2022), on the pretrained
backbones that ship with the install. Nothing is trained: good parts go through the frozen trunk
once, their patch features are kept in a memory bank, and a part is scored by how far its patches
lie from the nearest good patch:

    image (B, 3, H, W), normalised as the backbone expects
      └─ trunk ─► f8 (B, C8, H/8, W/8), f16 (B, C16, H/16, W/16)        Lite0: 40 + 112 channels
    3×3 average of each (a patch sees its neighbourhood), f16 upsampled to the f8 grid, concatenated
      ─► patches (B, C8 + C16, H/8, W/8)
    projected onto the good patches' top principal components (C8 + C16 → D, 64 by default)
    distance of each patch to its nearest neighbour in the bank (M, D)
      ─► patch map (B, H/8, W/8) ─► score = its maximum; anomaly map = the patch map upsampled to
         (H, W) and smoothed with a Gaussian (σ = 4 px at 256 px)

The bank is a greedy k-center coreset of the good patches, so it covers the good patches'
variety with a bounded number of points and the served graph's cost stays bounded. That cost is
the distance product, patches × bank × D: projecting the patches onto D = 64 principal components
first (176 → 64 for Lite0) buys a 3× larger bank at the same cost, and the larger bank covers the
good patches better (on the ladder's line at 256 px, test-split image AUROC 0.961 with 4,096 raw
patches, 0.969 with 12,000 projected ones; docs/benchmarks.md).

Scores are normalised inside the graph, ``s = d / (d + d_good)``, where ``d_good`` is the median raw
score of good parts held out from the bank: s is in [0, 1), about 0.5 on a typical good part, and
the review band's thresholds apply to it as to a classifier's defect score.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kensa.models.nets.backbones import get_backbone, load_with_provenance
from kensa.models.nets.spatial import split_trunk

ProgressCallback = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass(frozen=True)
class PatchCoreConfig:
    """How a PatchCore model is fitted. The defaults are sized for serving on a 2-core CPU."""

    backbone: str = "efficientnet_lite0"
    bank_size: int = 12_000  # patches kept in the memory bank (the served graph's main cost)
    max_patches: int = 400_000  # random subset of good patches the coreset is chosen from
    projection_dim: int = 64  # random projection the greedy coreset measures distances in
    # Principal components each patch is projected onto before the bank (None: the raw taps).
    reduce_dim: int | None = 64
    holdout: float = 0.1  # share of good parts kept out of the bank to set the score scale
    blur_sigma: float = 4.0  # anomaly-map smoothing at 256 px; scales with the input side
    features: int = 16  # drift features: PCA of the pooled patch embedding
    # Add the stride-4 tap (max-pooled to stride 8) to each patch: one-pixel scratches and cracks.
    # Measured on 300 good parts of the synthetic line at 128 px: image AUROC 0.87 -> 0.91,
    # pixel AUROC 0.973 -> 0.986, map peak on the defect 44 % -> 75 % of defective parts.
    fine: bool = True
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PatchFeatures(nn.Module):
    """Images in [0, 1] (B, 3, H, W) → locally aware patch features (B, C8 + C16, H/8, W/8)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        stem: nn.Module,
        low: nn.Module,
        mid: nn.Module,
        mean: Iterable[float],
        std: Iterable[float],
        fine: bool = False,
    ) -> None:
        super().__init__()
        self.stem, self.low, self.mid = stem, low, mid
        self.fine = fine
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std)).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        f4 = self.stem(x)
        f8 = self.low(f4)
        f16 = self.mid(f8)
        f8 = F.avg_pool2d(f8, 3, stride=1, padding=1, count_include_pad=False)
        f16 = F.avg_pool2d(f16, 3, stride=1, padding=1, count_include_pad=False)
        size = (int(f8.shape[-2]), int(f8.shape[-1]))  # int(): static shapes in the ONNX graph
        up = F.interpolate(f16, size=size, mode="bilinear", align_corners=False)
        if not self.fine:
            return torch.cat([f8, up], dim=1)
        # The stride-4 tap, max-pooled to stride 8: a one-pixel scratch's strongest response.
        f4 = F.max_pool2d(
            F.avg_pool2d(f4, 3, stride=1, padding=1, count_include_pad=False), 2, ceil_mode=True
        )
        return torch.cat([f4, f8, up], dim=1)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """A normalised 1-D Gaussian (k,), k = 2 · ceil(3σ) + 1 (odd, at least 3); applied along
    rows, then columns (separable: 2k multiplies per pixel instead of k²)."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-(t * t) / (2 * sigma * sigma))
    return g / g.sum()


class PatchCoreNet(nn.Module):
    """uint8 NHWC images → (probs (B, 2), features (B, K), score (B,), anomaly_map (B, H, W)).

    ``score`` and ``anomaly_map`` are normalised the same way (``d / (d + scale)``), so a map
    value above the band's flag threshold marks the region that made the part a defect.
    ``probs`` is ``(1 - score, score)`` over the classes ``ok`` and ``defect_anomaly``: the
    classifier's outputs, so the band, verdicts, prediction log and drift monitor read an anomaly
    model exactly as they read a classifier (defect score = 1 - p(ok) = score).
    """

    bank: torch.Tensor
    bank_sq: torch.Tensor
    proj: torch.Tensor
    scale: torch.Tensor
    blur: torch.Tensor
    pca_mean: torch.Tensor
    pca_components: torch.Tensor

    def __init__(
        self,
        features: PatchFeatures,
        bank: torch.Tensor,
        scale: float,
        blur_sigma: float,
        pca_mean: torch.Tensor,
        pca_components: torch.Tensor,
        proj: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.features = features
        # (C, D): patch features → the bank's space; the identity where patches are not reduced.
        eye = torch.eye(int(bank.shape[1]))
        self.register_buffer("proj", (eye if proj is None else proj).float().contiguous())
        self.register_buffer("bank", bank.float().contiguous())  # (M, D)
        self.register_buffer("bank_sq", (bank.float() ** 2).sum(1))  # (M,)
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("blur", gaussian_kernel(blur_sigma))
        self.register_buffer("pca_mean", pca_mean.float())
        self.register_buffer("pca_components", pca_components.float())

    def patch_distances(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [0, 1] → raw nearest-neighbour distances (B, h, w) and pooled patches (B, C)."""
        f = self.features(x)  # (B, C, h, w)
        c, h, w = (int(v) for v in f.shape[1:])  # the batch stays symbolic in the ONNX graph
        p = f.permute(0, 2, 3, 1).reshape(-1, c) @ self.proj
        # ||p - m||² = ||p||² - 2 p·m + ||m||², one matrix product instead of a (P, M, C) tensor;
        # ||p||² is the same for every m, so it is added after the minimum: the (P, M) product
        # and its bias are one Gemm, and nothing else touches the (P, M) matrix but the minimum.
        d2 = torch.addmm(self.bank_sq, p, self.bank.T, beta=1.0, alpha=-2.0).amin(dim=1)
        d = (d2 + (p * p).sum(1)).clamp_min(0.0).sqrt()
        return d.reshape(-1, h, w), f.mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = images.permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W) in [0, 1]
        size = (int(x.shape[-2]), int(x.shape[-1]))
        d, pooled = self.patch_distances(x)
        raw = d.amax(dim=(1, 2))
        up = F.interpolate(d.unsqueeze(1), size=size, mode="bilinear", align_corners=False)
        k = int(self.blur.shape[0])
        pad = k // 2
        smooth = F.pad(up, (pad, pad, pad, pad), mode="replicate")
        smooth = F.conv2d(smooth, self.blur.view(1, 1, k, 1))
        smooth = F.conv2d(smooth, self.blur.view(1, 1, 1, k))
        score = raw / (raw + self.scale)
        amap = smooth[:, 0] / (smooth[:, 0] + self.scale)
        features = (pooled - self.pca_mean) @ self.pca_components.T
        probs = torch.stack([1.0 - score, score], dim=1)
        return probs, features, score, amap


def build_patch_features(
    backbone: str = "efficientnet_lite0", load_weights: bool = True, fine: bool = False
) -> tuple[PatchFeatures, dict[str, Any] | None]:
    """The frozen trunk of a catalogue backbone as a patch-feature extractor, and its provenance."""
    spec = get_backbone(backbone)
    provenance: dict[str, Any] | None = None
    if load_weights:
        loaded = load_with_provenance(backbone)
        net = loaded.model
        provenance = {"name": backbone, "sha256": loaded.sha256, "weights": loaded.weights.name}
    else:
        net = spec.builder()
    stem, low, mid = split_trunk(backbone, net)
    extractor = PatchFeatures(stem, low, mid, spec.mean, spec.std, fine).eval()
    for p in extractor.parameters():
        p.requires_grad_(False)
    return extractor, provenance


def greedy_coreset(points: torch.Tensor, k: int, projection_dim: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``k`` points chosen by greedy k-center (farthest-point) selection.

    Distances are measured after a Gaussian random projection to ``projection_dim`` dimensions
    (Johnson-Lindenstrauss keeps them within a few per cent), which is what makes the O(N · k)
    selection affordable on a CPU.
    """
    n = points.shape[0]
    if k >= n:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    if projection_dim < points.shape[1]:
        proj = torch.randn(points.shape[1], projection_dim, generator=gen) / math.sqrt(projection_dim)
        z = points @ proj
    else:
        z = points
    z = z.contiguous()
    z_sq = (z * z).sum(1)
    chosen = torch.empty(k, dtype=torch.long)
    chosen[0] = int(torch.randint(n, (1,), generator=gen))
    min_d = torch.full((n,), float("inf"))
    for i in range(1, k):
        c = z[chosen[i - 1]]
        d = z_sq - 2.0 * (z @ c) + (c * c).sum()
        torch.minimum(min_d, d, out=min_d)
        chosen[i] = int(torch.argmax(min_d))
    return chosen


@torch.no_grad()
def _patches(extractor: PatchFeatures, images: torch.Tensor, batch: int = 32) -> Iterable[torch.Tensor]:
    for i in range(0, len(images), batch):
        x = images[i : i + batch].permute(0, 3, 1, 2).float() / 255.0
        yield extractor(x)


@dataclass
class PatchCoreFit:
    """A fitted model and what the fit saw."""

    net: PatchCoreNet
    config: PatchCoreConfig
    n_bank_parts: int
    n_holdout_parts: int
    n_patches_seen: int
    scale: float
    provenance: dict[str, Any] | None


@torch.no_grad()
def fit_patchcore(
    good_images: torch.Tensor,
    config: PatchCoreConfig | None = None,
    progress: ProgressCallback | None = None,
) -> PatchCoreFit:
    """Fit on good parts only: ``good_images`` is (N, H, W, 3) uint8, every one an ``ok`` part.

    A share (``config.holdout``) of the parts stays out of the bank; their median raw score sets the
    normalisation scale, so a good part the bank has not seen scores about 0.5.
    """
    config = config or PatchCoreConfig()
    n = len(good_images)
    if n < 2:
        raise ValueError(f"PatchCore needs at least 2 good parts to fit; got {n}")
    gen = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(n, generator=gen)
    n_hold = max(1, int(round(config.holdout * n)))
    hold_idx, bank_idx = order[:n_hold], order[n_hold:]
    extractor, provenance = build_patch_features(config.backbone, fine=config.fine)

    per_part = max(1, config.max_patches // max(1, len(bank_idx)))
    kept: list[torch.Tensor] = []
    pooled: list[torch.Tensor] = []
    seen = done = 0
    bank_images = good_images[bank_idx]
    for f in _patches(extractor, bank_images):
        b, c, h, w = f.shape
        p = f.permute(0, 2, 3, 1).reshape(b, h * w, c)
        pooled.append(f.mean(dim=(2, 3)))
        take = min(per_part, h * w)
        for j in range(b):
            sel = torch.randperm(h * w, generator=gen)[:take]
            kept.append(p[j, sel])
        seen += b * h * w
        done += b
        if progress:
            progress("features", done, len(bank_images))
    candidates = torch.cat(kept)
    proj = patch_projection(candidates, config.reduce_dim, gen)
    if proj is not None:
        candidates = candidates @ proj
    if progress:
        progress("coreset", 0, 1)
    idx = greedy_coreset(
        candidates, min(config.bank_size, len(candidates)), config.projection_dim, config.seed
    )
    bank = candidates[idx]
    if progress:
        progress("coreset", 1, 1)

    emb = torch.cat(pooled).double()
    mean = emb.mean(0)
    k = max(1, min(config.features, emb.shape[1], len(emb) - 1))
    _, _, vh = torch.linalg.svd(emb - mean, full_matrices=False)
    net = PatchCoreNet(
        extractor,
        bank,
        1.0,
        blur_sigma_for(config.blur_sigma, int(good_images.shape[1])),
        mean.float(),
        vh[:k].float(),
        proj,
    )
    net.eval()
    raw = raw_scores(net, good_images[hold_idx])
    scale = float(np.median(raw)) if raw.size else 1.0
    net.scale.fill_(max(scale, 1e-6))
    return PatchCoreFit(net, config, len(bank_idx), n_hold, seen, float(net.scale), provenance)


def patch_projection(
    patches: torch.Tensor, dims: int | None, gen: torch.Generator, sample: int = 50_000
) -> torch.Tensor | None:
    """(C, D) top principal directions of good patches (from a seeded sample), or None to keep C.

    Not centred: the bank and the patches are projected alike, so distances between them are
    those of their centred versions.
    """
    if dims is None or dims >= patches.shape[1]:
        return None
    rows = patches[torch.randperm(len(patches), generator=gen)[:sample]].double()
    _, _, vh = torch.linalg.svd(rows - rows.mean(0), full_matrices=False)
    return vh[:dims].T.float().contiguous()


def blur_sigma_for(sigma_at_256: float, side: int) -> float:
    """The smoothing σ for an input side, scaled from its value at 256 px (at least 0.5 px)."""
    return max(0.5, sigma_at_256 * side / 256)


@torch.no_grad()
def raw_scores(net: PatchCoreNet, images: torch.Tensor, batch: int = 32) -> np.ndarray:
    """Un-normalised image scores (max nearest-neighbour patch distance) of (N, H, W, 3) uint8 images."""
    out = []
    for i in range(0, len(images), batch):
        x = images[i : i + batch].permute(0, 3, 1, 2).float() / 255.0
        d, _ = net.patch_distances(x)
        out.append(d.amax(dim=(1, 2)))
    return torch.cat(out).numpy() if out else np.zeros(0)


@torch.no_grad()
def score_images(net: PatchCoreNet, images: torch.Tensor, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Normalised scores (N,) and anomaly maps (N, H, W) of (N, H, W, 3) uint8 images."""
    scores, maps = [], []
    for i in range(0, len(images), batch):
        _, _, s, m = net(images[i : i + batch])
        scores.append(s)
        maps.append(m)
    return torch.cat(scores).numpy(), torch.cat(maps).numpy()
