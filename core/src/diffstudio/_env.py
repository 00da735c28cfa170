"""On/off environment switches (``DIFFSTUDIO_...=0`` turns a default-on behaviour off). Imports nothing heavy."""

from __future__ import annotations

import os

__all__ = ["switch_on"]

_OFF = frozenset({"0", "false", "no", "off"})


def switch_on(name: str) -> bool:
    """False when the variable ``name`` is ``0``, ``false``, ``no`` or ``off`` (any case); True otherwise or unset."""
    return os.environ.get(name, "1").strip().lower() not in _OFF
