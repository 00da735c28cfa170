"""diffstudio-flux2: the FLUX.2 family (dev and klein) for diffstudio.

The model code lives in ``params``, ``math``, ``layers``, ``model`` (the DiT ``Flux2``), ``vae``
(``Flux2AutoEncoder``) and ``convert`` (diffusers <-> BFL converters and format probes). This module stays
import-cheap (no torch).
"""

from __future__ import annotations

__all__: list[str] = []
