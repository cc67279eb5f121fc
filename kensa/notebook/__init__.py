"""The public notebook API (light: imports no Prefect)."""
