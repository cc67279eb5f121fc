"""HTTP routes, one module per resource: inspect (v1), v2 (Open Inference), admin, metrics."""
