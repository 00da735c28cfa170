"""diffstudio-colour-shift: the ``diffstudio/colour-shift`` Diffusion Template (LoRA medium) for the shapes model."""

from __future__ import annotations

TEMPLATE_NAME = "diffstudio/colour-shift"

__all__ = ["TEMPLATE_NAME"]
