"""Pure ML: the synthetic line, datasets, model zoo, training, QC evaluation, corruptions, export."""
