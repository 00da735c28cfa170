"""Entry module of diffstudio-qwen-vl: the ``load_model`` claim of Qwen2.5-VL checkpoints (no torch at import)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffstudio import hookimpl

if TYPE_CHECKING:
    from diffstudio.config import ModelConfig
    from diffstudio.loading import Checkpoint
    from diffstudio.types import ModelClaim


@hookimpl
def load_model(checkpoint: Checkpoint, config: ModelConfig) -> ModelClaim | None:
    """Claim Qwen2.5-VL checkpoints (either key layout) for the shared ``qwen_vl`` slot (family ``qwen-vl``)."""
    from diffstudio_qwen_vl.slot import claim

    return claim(checkpoint)
