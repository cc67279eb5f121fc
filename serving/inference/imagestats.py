"""Image statistics logged with every prediction; defined once in ``monitoring.features``."""

from kensa.monitoring.features import image_stats

__all__ = ["image_stats"]
