"""diffstudio-flex: ostris/Flex.2-preview (a FLUX.1 DiT with 196 input channels) for the FLUX.1 pipeline.

The DiT itself is a plain FLUX.1 DiT (the flux1 family loads it, claimed as ``flux1-dit/flex``); this plugin builds
the 132 conditioning channels it takes beside the 64 latent channels (:mod:`diffstudio_flex.conditioning`) in the
``flex_conditioning`` unit (:mod:`diffstudio_flex.units`), from the seed's arguments ``flex_inpaint_image``,
``flex_inpaint_mask``, ``flex_control_image``, ``flex_control_strength`` and ``flex_control_stop``.
"""

from __future__ import annotations

__all__ = ["FLEX_IN_CHANNELS"]

FLEX_IN_CHANNELS = 196
"""Input channels of the Flex.2 DiT's ``img_in``: 64 latent + 64 inpaint latent + 4 mask + 64 control latent."""
