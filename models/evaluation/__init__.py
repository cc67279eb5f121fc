"""QC evaluation: metrics, the review band and its guarantee, corruptions, comparison."""
