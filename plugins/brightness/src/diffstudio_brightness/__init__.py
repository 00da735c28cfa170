"""diffstudio-brightness: the ``diffstudio/brightness`` Diffusion Template (KV-cache medium) for the shapes model."""

from __future__ import annotations

TEMPLATE_NAME = "diffstudio/brightness"

__all__ = ["TEMPLATE_NAME"]
