"""The recipe that rebuilds the embedded ``diffstudio/shapes`` model from nothing.

Stages (each a ``diffstudio shapes-build STAGE`` command, all chained by ``make shapes-model``):

1. ``text``: a byte-level BPE tokenizer (Qwen2 pre-tokenizer, Qwen3 chat template) trained on the caption
   vocabulary, and a Qwen3-architecture text encoder frozen at a seeded random initialisation;
2. ``vae``: a small FLUX.2 autoencoder trained on rendered shapes, with its latent BatchNorm statistics;
3. ``dit-init``: a seeded random FLUX.2-klein-architecture DiT in the BFL single-file layout;
4. the DiT is then trained by ``diffstudio train`` (split training: ``sft:data_process`` then ``sft:train``).

Every stage is deterministic on a given machine (fixed seeds, fixed step counts), writes atomically and skips
work whose output already exists.
"""
