"""The ``kensa`` command: one entry layer over every part."""
