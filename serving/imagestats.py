"""Image statistics logged with every prediction, for drift monitoring (brightness, contrast, ...).

Computed once per image at decode time on the model-input image (uint8 RGB, S × S after resizing),
so they describe exactly what the model saw and cost a few microseconds. The monitoring part will
own these definitions (``monitoring/features.py``); until then this one function is the source.
"""

from __future__ import annotations

import numpy as np

# ITU-R BT.601 luma weights: the usual "perceived brightness" of an RGB pixel.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def image_stats(rgb: np.ndarray) -> dict[str, float]:
    """Statistics of one uint8 RGB image (H, W, 3).

    * ``brightness``: mean luma, 0–255.
    * ``contrast``: standard deviation of luma (RMS contrast), 0–127.5.
    * ``sharpness``: variance of the 4-neighbour Laplacian of luma; drops when the lens defocuses.
    * ``r_mean``, ``g_mean``, ``b_mean``: channel means, 0–255.
    * ``rg_ratio``, ``bg_ratio``: colour balance, red and blue means over green (a white-balance
      or lighting shift moves them).
    """
    pixels = rgb.astype(np.float32)
    luma = pixels @ _LUMA  # (H, W)
    lap = (
        -4.0 * luma[1:-1, 1:-1]
        + luma[:-2, 1:-1]
        + luma[2:, 1:-1]
        + luma[1:-1, :-2]
        + luma[1:-1, 2:]
    )
    means = pixels.reshape(-1, 3).mean(axis=0)
    green = max(float(means[1]), 1e-6)  # a black image has no colour balance; avoid 0/0
    return {
        "brightness": round(float(luma.mean()), 4),
        "contrast": round(float(luma.std()), 4),
        "sharpness": round(float(lap.var()) if lap.size else 0.0, 4),
        "r_mean": round(float(means[0]), 4),
        "g_mean": round(float(means[1]), 4),
        "b_mean": round(float(means[2]), 4),
        "rg_ratio": round(float(means[0]) / green, 6),
        "bg_ratio": round(float(means[2]) / green, 6),
    }
