"""Stage ``dit-init``: a seeded random FLUX.2-klein-architecture DiT in the BFL single-file layout.

The DiT is then trained by ``diffstudio train`` (see ``recipe/__init__``). Its context width is the text
encoder's ``3 * hidden`` and its token width the VAE's ``4 * z_channels``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffstudio.train.checkpoints import save_weights
from diffstudio_flux2 import Flux2, Flux2Params

from diffstudio_shapes.recipe.sizes import DIT, TEXT, VAE, DitSizes


def dit_params(sizes: DitSizes = DIT) -> Flux2Params:
    """The shapes DiT's sizes."""
    head_dim = sizes.hidden_size // sizes.num_heads
    return Flux2Params(
        in_channels=VAE.z_channels * 4,
        context_in_dim=TEXT.hidden_size * 3,
        hidden_size=sizes.hidden_size,
        num_heads=sizes.num_heads,
        depth=sizes.depth,
        depth_single_blocks=sizes.depth_single_blocks,
        axes_dim=(head_dim // 4,) * 4,
        mlp_ratio=sizes.mlp_ratio,
        use_guidance_embed=False,
    )


def write_random_dit(path: Path, seed: int = 0, sizes: DitSizes = DIT) -> Path:
    """Save a seeded random DiT (PyTorch's default initialisation) to ``path`` in BFL key names."""
    torch.manual_seed(seed)
    model = Flux2(dit_params(sizes))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metadata = {"diffstudio.recipe": json.dumps({"stage": "dit-init", "seed": seed})}
    return save_weights(path, state, metadata)
