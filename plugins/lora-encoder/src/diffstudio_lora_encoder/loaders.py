"""Detection and loading of LoRA-encoder checkpoints (what the ``load_model`` hook returns).

The published file (DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev ``model.safetensors``) stores the module names as
keys, with no converter: ``embedder.model_dict.<layer>.x`` / ``.layer_norm.*``, ``embedder.proj_dict.<type>.*``,
``encoders.<i>.*``, ``special_embeds``, ``final_layer_norm.*``, ``final_linear.*``. It is claimed by those names;
every size is read from the shapes, and the head count (not stored) from ``ModelConfig(config=
{"num_attention_heads": H})`` or the published head width 128 (``D / 128`` heads: 32 for the official encoder).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffstudio.types import LoadRequest, ModelClaim

if TYPE_CHECKING:
    from diffstudio.loading import Checkpoint
    from torch import nn

FAMILY = "flux1"
COMPONENT = "lora_encoder"
_REQUIRED = ("special_embeds", "final_linear.weight", "final_layer_norm.weight", "encoders.0.fc1.weight")


def claim_lora_encoder(checkpoint: Checkpoint) -> ModelClaim | None:
    """Claim a LoRA encoder (``embedder.model_dict.*.x`` probes, a special token and a final linear)."""
    names = set(checkpoint.keys())
    if not all(key in names for key in _REQUIRED):
        return None
    if not any(k.startswith("embedder.model_dict.") and k.endswith(".x") for k in names):
        return None
    return ModelClaim(FAMILY, "flux1-lora-encoder", COMPONENT, "diffsynth", load_lora_encoder)


def load_lora_encoder(checkpoint: Checkpoint, request: LoadRequest) -> nn.Module:
    """Build :class:`~diffstudio_lora_encoder.model.FluxLoraEncoder` from a claimed checkpoint (strict).

    Raises:
        ConfigError: A ``num_attention_heads`` that does not divide the width, or shapes of no LoRA encoder.
    """
    from diffstudio.loading import build_on_meta, load_state_dict_into
    from diffstudio.loading.component_config import explicit_config

    from diffstudio_lora_encoder.model import FluxLoraEncoder, LoraEncoderParams

    keys = checkpoint.keys()
    config = explicit_config(request.config.config) or {}
    heads = config.get("num_attention_heads")
    params = LoraEncoderParams.from_shapes(
        {k: tuple(checkpoint.shape(k)) for k in keys}, None if heads is None else int(heads)
    )
    model = build_on_meta(lambda: FluxLoraEncoder(params))
    load_state_dict_into(model, checkpoint.state_dict(keys), dtype=request.torch_dtype, device=request.device)
    return model.eval().requires_grad_(False)
