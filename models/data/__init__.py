"""Datasets: discovery, validation, splits, versions, torch datasets, reviewed additions."""
