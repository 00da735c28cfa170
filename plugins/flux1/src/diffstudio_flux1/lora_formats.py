"""FLUX.1 LoRA layouts (filled in below)."""

from __future__ import annotations

from typing import Any


def layouts() -> list[Any]:
    """Every FLUX.1 LoRA layout."""
    return []
