"""kensa: visual quality control from a cheap pilot to a monitored production service."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The notebook API, imported on first use so `import kensa` (and `kensa --help`) stays light:
# these pull in torch, MLflow and the flows.
_LAZY = {
    "ExperimentData": "kensa.notebook.experiments",
    "ExperimentResult": "kensa.notebook.experiments",
    "open_dataset": "kensa.notebook.experiments",
    "log_experiment": "kensa.notebook.experiments",
    "register_model": "kensa.notebook.experiments",
    "IncompatibleModelError": "kensa.notebook.experiments",
    "compare_versions": "kensa.notebook.compare",
}

if TYPE_CHECKING:
    from kensa.notebook.compare import compare_versions
    from kensa.notebook.experiments import (
        ExperimentData,
        ExperimentResult,
        IncompatibleModelError,
        log_experiment,
        open_dataset,
        register_model,
    )

__all__ = [
    "ExperimentData",
    "ExperimentResult",
    "IncompatibleModelError",
    "__version__",
    "compare_versions",
    "log_experiment",
    "open_dataset",
    "register_model",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    msg = f"module 'kensa' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
