"""The core's version, also used for plugin compatibility checks."""

__version__ = "0.1.0"
