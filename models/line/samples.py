"""Sample sheets for people (docs, reviews): a grid per class and a sweep per condition."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kensa.models.line.conditions import (
    CAMERAS,
    CLASSES,
    CONDITION_SWEEPS,
    VARIANTS,
    LineConditions,
    _check_size,
)
from kensa.models.line.render import generate_part, part_seed


def save_sample_sheets(
    out_dir: str | Path, seed: int = 0, image_size: int = 128, per_class: int = 6
) -> tuple[Path, Path]:
    """Save ``samples_by_class.png`` and ``samples_by_condition.png`` into ``out_dir``."""
    from matplotlib.figure import Figure  # a Figure of its own: no pyplot, no backend chosen

    _check_size(image_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = LineConditions()

    fig = Figure(figsize=(1.6 * per_class, 1.75 * len(CLASSES)))
    axes = fig.subplots(len(CLASSES), per_class, squeeze=False)
    for r, cls in enumerate(CLASSES):
        for c in range(per_class):  # columns cycle through variants and cameras
            shown = base.with_overrides({"variant": VARIANTS[c % 3], "camera": CAMERAS[c // 3 % 2]})
            image, rec = generate_part(part_seed(seed, 100 * r + c), shown, image_size, label=cls)
            ax = axes[r, c]
            ax.imshow(image)
            sev = "" if rec.defect_severity is None else f" sev {rec.defect_severity:.2f}"
            ax.set_title(f"{rec.variant}/{rec.camera}{sev}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(cls, fontsize=8)
    fig.suptitle(f"Synthetic line: a row per class (seed {seed}, {image_size} px)", fontsize=11)
    fig.tight_layout()
    by_class = out / "samples_by_class.png"
    fig.savefig(by_class, dpi=110)

    # One part, good and with a clear crack, swept through every condition (no jitter).
    still = base.with_overrides({"jitter": 0.0, "variant": "A", "camera": "C1"})

    def crack_visibility(part: int) -> int:  # grey-level change the crack makes, at 64 px
        cracked, ok = (generate_part(part, still, 64, lab)[0] for lab in ("defect_crack", "ok"))
        return int(np.abs(cracked.astype(np.int32) - ok).sum())

    subject = max((part_seed(seed, 1000 + i) for i in range(30)), key=crack_visibility)
    subjects = [(subject, "ok"), (subject, "defect_crack")]
    steps = len(next(iter(CONDITION_SWEEPS.values())))
    cols = steps * len(subjects)
    fig = Figure(figsize=(1.25 * cols, 1.45 * len(CONDITION_SWEEPS)))
    axes = fig.subplots(len(CONDITION_SWEEPS), cols, squeeze=False)
    for r, (name, values) in enumerate(CONDITION_SWEEPS.items()):
        for s_i, (s_seed, s_label) in enumerate(subjects):
            for v_i, value in enumerate(values):
                image, _ = generate_part(s_seed, still.with_overrides({name: value}), image_size, s_label)
                ax = axes[r, s_i * steps + v_i]
                ax.imshow(image)
                ax.set_title(f"{s_label.removeprefix('defect_')} {name}={value:g}", fontsize=6)
                ax.set_xticks([])
                ax.set_yticks([])
                if s_i == 0 and v_i == 0:
                    ax.set_ylabel(name, fontsize=8)
    fig.suptitle(
        f"Synthetic line: one part, good (left) and cracked (right), under each condition "
        f"(seed {seed}, {image_size} px)",
        fontsize=11,
    )
    fig.tight_layout()
    by_condition = out / "samples_by_condition.png"
    fig.savefig(by_condition, dpi=110)
    return by_class, by_condition
