"""How fast a rung trains on a device, measured before any spend, so a stage can be priced.

A frozen-backbone rung pays its trunk's forward pass once per image (the maps are cached) and then
only the small trained part each epoch; timing a full forward and backward pass would overstate it
several times over. So each rung is timed the way it trains:

``all`` (and every from-scratch model): one optimizer step on images, every epoch.
``head`` / ``last``: the frozen trunk's maps once (no gradients), then one step on the maps per epoch.
``patchcore``: no epochs; the patch features of every good part once, then the coreset and the
hold-out scoring, priced as a second pass at the same rate (measured here: a 1,800-part fit at
256 px took 1.2–1.8× its feature pass).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kensa.models.nets.zoo import build_model, check_finetune
from kensa.models.train.finetune import FromMaps, apply_finetune, cached_taps, trunk_maps


@dataclass(frozen=True)
class TrainSpeed:
    """Measured rates of one rung: images/s through the frozen trunk (None: nothing is cached) and
    images/s of training steps."""

    model: str
    finetune: str
    step_images_per_second: float
    extract_images_per_second: float | None = None
    epochs_apply: bool = True  # False for a fit without epochs (patchcore): one pass, whatever asked

    def seconds(self, images: int, epochs: int) -> float:
        """Training seconds for ``images`` distinct images seen ``epochs`` times."""
        once = images / self.extract_images_per_second if self.extract_images_per_second else 0.0
        passes = epochs if self.epochs_apply else 1
        return once + images * passes / max(self.step_images_per_second, 1e-9)

    def effective_rate(self, images: int, epochs: int) -> float:
        """Training images (``images × epochs``) per second, the cached pass included."""
        return images * epochs / max(self.seconds(images, epochs), 1e-9)


def _rate(fn: Callable[[], object], images: int, steps: int) -> float:
    fn()  # warm-up: allocations and kernel selection are not throughput
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return steps * images / max(time.perf_counter() - t0, 1e-9)


def measure_train_speed(
    model_name: str,
    image_size: int,
    num_classes: int,
    finetune: str | None = None,
    device: str = "cpu",
    batch_size: int = 16,
    steps: int = 2,
) -> TrainSpeed:
    """Time a few steps of ``model_name`` at rung ``finetune`` (None: the model's default rung)."""
    if model_name == "patchcore":
        return _patchcore_speed(image_size, batch_size, steps)
    rung = check_finetune(model_name, finetune)
    model = build_model(model_name, num_classes, input_size=image_size).to(device).train()
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    loss_fn = nn.CrossEntropyLoss()
    taps = cached_taps(rung)
    if not taps:
        x = torch.rand(batch_size, 3, image_size, image_size, device=device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

        return TrainSpeed(model_name, rung, _rate(step, batch_size, steps))
    apply_finetune(model, rung)
    images = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8)
    extract = _rate(lambda: trunk_maps(model, images, taps), batch_size, steps)
    maps = [m.float().to(device) for m in trunk_maps(model, images, taps)]
    head = FromMaps(model)
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1e-3)

    def head_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(head(*maps), y).backward()
        opt.step()

    return TrainSpeed(model_name, rung, _rate(head_step, batch_size, steps), extract)


def _patchcore_speed(image_size: int, batch_size: int, steps: int) -> TrainSpeed:
    """The patch-feature pass of PatchCore's default backbone, timed as the fit runs it."""
    from kensa.models.nets.patchcore import PatchCoreConfig, build_patch_features

    features, _ = build_patch_features(PatchCoreConfig().backbone, load_weights=False, fine=True)
    features.eval()
    x = torch.rand(batch_size, 3, image_size, image_size)

    @torch.no_grad()
    def extract() -> None:
        features(x)

    rate = _rate(extract, batch_size, steps)
    return TrainSpeed("patchcore", "fit", rate, rate, epochs_apply=False)
