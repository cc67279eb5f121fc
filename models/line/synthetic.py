"""The synthetic line: deterministic images of machined parts, defects and shop-floor conditions.

Each image shows one metal part (variant ``A`` rectangular plate, ``B`` turned round flange, ``C``
link bracket) on a rubber conveyor belt, lit from the upper left, as one of two cameras on a line
sees it. Defects (scratch, dent, stain, missing hole, crack) have a severity drawn per part, so
some are obvious and some barely visible; ok parts carry nuisance marks (oil spots, tool marks,
dust) that look a little like defects. The line conditions (lighting, colour temperature, glare,
blur, noise, camera offset and rotation) are a frozen :class:`LineConditions`; each part jitters
around them, and the values actually used are recorded in its :class:`PartRecord`.

Determinism: every random draw comes from ``numpy`` generators seeded by ``(part seed, stream)``;
the draws never depend on the condition values or on the forced label, so the same part can be
re-rendered under other conditions or with another defect and only that one thing changes.

Units: lengths in "px" (blur, shift, defect widths) are pixels of a 128-px image and scale with
``image_size``, so the same conditions mean the same optics at any resolution; ``noise`` is a
sigma in 0..255 grey levels at any size.

The code lives in :mod:`models.line` (``conditions``, ``scene``, ``optics``, ``defects``,
``render``, ``dataset``, ``samples``); this module is its public face, and the one to import.
"""

from __future__ import annotations

from kensa.models.line.conditions import (
    CAMERAS,
    CLASSES,
    CONDITION_COLUMNS,
    CONDITION_SWEEPS,
    DEFECT_TYPES,
    GENERATOR_VERSION,
    MANIFEST_COLUMNS,
    MANIFEST_NAME,
    MARKER_NAME,
    MASK_CONTRAST,
    MASKS_DIR,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    REFERENCE_SIZE,
    VARIANTS,
    LineConditions,
    PartRecord,
)
from kensa.models.line.dataset import (
    ProgressCallback,
    encode_png,
    generate_dataset,
    iter_parts,
    read_manifest,
    read_mask,
)
from kensa.models.line.render import generate_part, part_seed
from kensa.models.line.samples import save_sample_sheets
from kensa.models.line.scene import Hole

__all__ = [
    "CAMERAS",
    "CLASSES",
    "CONDITION_COLUMNS",
    "CONDITION_SWEEPS",
    "DEFECT_TYPES",
    "GENERATOR_VERSION",
    "MANIFEST_COLUMNS",
    "MANIFEST_NAME",
    "MARKER_NAME",
    "MASK_CONTRAST",
    "MASKS_DIR",
    "MAX_IMAGE_SIZE",
    "MIN_IMAGE_SIZE",
    "REFERENCE_SIZE",
    "VARIANTS",
    "Hole",
    "LineConditions",
    "PartRecord",
    "ProgressCallback",
    "encode_png",
    "generate_dataset",
    "generate_part",
    "iter_parts",
    "read_mask",
    "part_seed",
    "read_manifest",
    "save_sample_sheets",
]
