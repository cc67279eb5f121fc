"""Names flows and serving agree on in the MLflow registry (they meet there, never in code)."""

from __future__ import annotations

ALIAS_CHAMPION = "champion"
ALIAS_CANDIDATE = "candidate"

# The ONNX file inside a registered model version's MLflow model directory.
MODEL_ARTIFACT = "model"  # mlflow.onnx.log_model(name=MODEL_ARTIFACT)
ONNX_FILE = "model.onnx"

# Model-version tags every kensa-registered version carries.
TAG_SHA256 = "kensa.onnx_sha256"  # SHA-256 of the ONNX file at registration
TAG_DATASET_VERSION = "kensa.dataset_version"
TAG_THRESHOLDS = "kensa.thresholds"  # JSON: t_ok, t_defect, alpha, delta, guaranteed
TAG_KPI = "kensa.kpi"  # JSON: target vs achieved
TAG_COST = "kensa.cost"  # JSON: training cost, serving cost per million parts, TCO
TAG_PARITY = "kensa.parity"  # JSON parity report
TAG_CODE_VERSION = "kensa.code_version"
TAG_REGISTERED_BY = "kensa.registered_by"
TAG_STATUS = "kensa.status"  # candidate | approved | rejected | retired
TAG_SOURCE = "kensa.source"  # pilot | sweep | retrain | register | experiment
