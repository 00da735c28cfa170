"""Blocks of the FLUX.1 DiT, with attribute names equal to BFL's checkpoint keys.

The layers and the self-modulated double / single blocks are shared (:mod:`diffstudio.dit.layers`,
:mod:`diffstudio.dit.blocks`); FLUX.1 uses them with biases everywhere and 3-axis ids. The names stay importable
from here.
"""

from __future__ import annotations

from diffstudio.dit.blocks import DoubleStreamBlock, SingleStreamBlock
from diffstudio.dit.layers import (
    EmbedND,
    LastLayer,
    MaskedAttentionProcessor,
    MLPEmbedder,
    ModParams,
    Modulation,
    SelfAttention,
)
from diffstudio.nn import DEFAULT_PROCESSOR, AttentionContext, AttentionProcessor

__all__ = [
    "DEFAULT_PROCESSOR",
    "AttentionContext",
    "AttentionProcessor",
    "DoubleStreamBlock",
    "EmbedND",
    "LastLayer",
    "MLPEmbedder",
    "MaskedAttentionProcessor",
    "ModParams",
    "Modulation",
    "SelfAttention",
    "SingleStreamBlock",
]
