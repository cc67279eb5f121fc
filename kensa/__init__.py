"""kensa: visual quality control from a cheap pilot to a monitored production service."""

__version__ = "0.1.0"
