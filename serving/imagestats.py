"""Image statistics logged with every prediction; defined once in ``monitoring.features``."""

from monitoring.features import image_stats

__all__ = ["image_stats"]
