"""Frozen-backbone feature maps of a dataset's training split, computed once and kept on disk.

A frozen trunk gives the same maps for the same pixels every epoch and every trial, so the pilot,
each sweep point and each epoch of a ``head``/``last`` run read them instead of re-running the
backbone. The key is the content of everything that decides the maps: dataset version, backbone,
weights sha256, input size, image recipe and taps; anything else (seed, fraction, epochs, learning
rate) only picks rows, so every trial on the same data shares one file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kensa.settings import Settings

log = logging.getLogger(__name__)

# Bump when the extraction changes in a way the key cannot see (e.g. a tap moved to another block
# with the same channel count).
CACHE_FORMAT = "kensa-features/1"
EXTRACT_BATCH = 64


def feature_cache_dir(settings: Settings) -> Path:
    """Where a kensa installation keeps feature caches: ``<data_dir>/cache/features``."""
    return settings.data_dir / "cache" / "features"


@dataclass(frozen=True)
class FeatureKey:
    """Everything that decides the cached maps; its digest names the file."""

    dataset_version: str
    backbone: str
    weights_sha256: str
    image_size: int
    preprocess: dict[str, Any]  # Preprocess.to_dict(): fit, roi, pad
    # Channels of each cached map, in order: (C4, C8, C16) for finetune head, (C4, C8) for last.
    taps: tuple[int, ...]

    def digest(self) -> str:
        text = json.dumps({"format": CACHE_FORMAT, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def record(self) -> dict[str, Any]:
        """The key as plain JSON types (tuples as lists), as stored in the file and compared."""
        value: dict[str, Any] = json.loads(json.dumps(asdict(self)))
        return value

    def file_name(self) -> str:
        return f"{self.backbone}-{self.image_size}px-t{len(self.taps)}-{self.digest()[:24]}.pt"


@dataclass
class FeatureMaps:
    """Maps of a record list (rows in its order) and how they were obtained."""

    maps: list[torch.Tensor]  # float16, one (N, C, h, w) tensor per tap
    source: str  # "hit": read from the cache; "computed": extracted (and written if a dir was given)
    seconds: float  # wall time spent reading or extracting
    path: Path | None  # the cache file (None: no cache dir)


def _read(path: Path, key: FeatureKey, paths: Sequence[str]) -> list[torch.Tensor] | None:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file is a miss, recomputed
        log.warning("event=feature_cache_unreadable path=%s error=%s", path, err)
        return None
    # The digest already names the key; comparing the stored key and record list also catches a
    # file copied under another name and a hash prefix collision.
    if (
        not isinstance(payload, dict)
        or payload.get("format") != CACHE_FORMAT
        or payload.get("key") != key.record()
        or payload.get("paths") != list(paths)
    ):
        log.warning("event=feature_cache_mismatch path=%s", path)
        return None
    maps = payload["maps"]
    shapes = [(m.shape[0], m.shape[1]) for m in maps]
    if shapes != [(len(paths), c) for c in key.taps]:
        log.warning("event=feature_cache_mismatch path=%s", path)
        return None
    return list(maps)


def _write(path: Path, key: FeatureKey, paths: Sequence[str], maps: list[torch.Tensor]) -> bool:
    payload = {"format": CACHE_FORMAT, "key": key.record(), "paths": list(paths), "maps": maps}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            torch.save(payload, tmp_name)
            os.replace(tmp_name, path)  # atomic: a concurrent trial reads the old file or the new
        finally:
            Path(tmp_name).unlink(missing_ok=True)
    except OSError as err:
        # A read-only or full disk costs only the reuse: this run has its maps in memory.
        log.warning("event=feature_cache_not_written path=%s error=%s", path, err)
        return False
    return True


def feature_maps(
    key: FeatureKey,
    paths: Sequence[str],
    images: Callable[[], torch.Tensor],
    extract: Callable[[torch.Tensor], list[torch.Tensor]],
    cache_dir: Path | None,
) -> FeatureMaps:
    """The maps of the records ``paths``: from ``cache_dir`` when present, else extracted and stored.

    ``images`` decodes the uint8 images (N, 3, S, S) in ``paths`` order, called only on a miss;
    ``extract`` maps a batch of them to one float16 map per entry of ``key.taps``.
    """
    t0 = time.perf_counter()
    path = cache_dir / key.file_name() if cache_dir is not None else None
    if path is not None and path.is_file():
        maps = _read(path, key, paths)
        if maps is not None:
            seconds = time.perf_counter() - t0
            log.info("event=feature_cache_hit path=%s rows=%d seconds=%.2f", path, len(paths), seconds)
            return FeatureMaps(maps, "hit", seconds, path)
    pixels = images()
    batches = [extract(pixels[i : i + EXTRACT_BATCH]) for i in range(0, len(pixels), EXTRACT_BATCH)]
    maps = [torch.cat([b[t] for b in batches]) for t in range(len(key.taps))]
    if path is not None and not _write(path, key, paths, maps):
        path = None
    seconds = time.perf_counter() - t0
    log.info(
        "event=feature_cache_computed path=%s rows=%d seconds=%.2f megabytes=%.1f",
        path,
        len(paths),
        seconds,
        sum(m.numel() * m.element_size() for m in maps) / 1e6,
    )
    return FeatureMaps(maps, "computed", seconds, path)
