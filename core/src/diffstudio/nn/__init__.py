"""Family-independent neural-network primitives shared by model plugins.

Only stable building blocks live here (the same spirit as diffusers' ``embeddings.py``): attention dispatch in
the ``(B, L, H, D)`` token layout with the blocks' processor slot (:class:`AttentionContext`,
:class:`AttentionProcessor`) and K/V extension (:func:`extend_kv`), ``RMSNorm`` and ``QKNorm``, rotary position
embeddings over N id axes, the sinusoidal timestep embedding, :class:`DeltaLinear`, the ``nn.Linear`` that
carries named side paths (LoRA without merging), the :func:`linear` it calls (oneDNN on CPU for inference) and
:func:`merge_heads_beside` (single-block concat). :mod:`diffstudio.nn.ldm` (imported on its own) has the LDM
autoencoder's encoder and decoder that both FLUX families' VAEs wrap. Importing this package imports torch.
"""

from __future__ import annotations

from diffstudio.nn.attention import (
    DEFAULT_PROCESSOR,
    AttentionContext,
    AttentionProcessor,
    BlockKind,
    SDPAProcessor,
    attention,
    extend_kv,
    match_batch,
)
from diffstudio.nn.concat import OutActivation, merge_heads_beside
from diffstudio.nn.delta import (
    DeltaCombiner,
    DeltaFn,
    DeltaLinear,
    DeltaMap,
    delta_linears,
    scoped_deltas,
    to_delta_linears,
)
from diffstudio.nn.embeddings import timestep_embedding
from diffstudio.nn.linear import linear
from diffstudio.nn.modulation import gated, modulate
from diffstudio.nn.norm import QKNorm, RMSNorm
from diffstudio.nn.rope import RopeFreqs, apply_rope, rope_frequencies

__all__ = [
    "DEFAULT_PROCESSOR",
    "AttentionContext",
    "AttentionProcessor",
    "BlockKind",
    "DeltaCombiner",
    "DeltaFn",
    "DeltaLinear",
    "DeltaMap",
    "OutActivation",
    "QKNorm",
    "RMSNorm",
    "RopeFreqs",
    "SDPAProcessor",
    "apply_rope",
    "attention",
    "delta_linears",
    "extend_kv",
    "gated",
    "linear",
    "match_batch",
    "merge_heads_beside",
    "modulate",
    "rope_frequencies",
    "scoped_deltas",
    "timestep_embedding",
    "to_delta_linears",
]
