"""Detection and loading of LoRAFusion checkpoints (what the ``load_model`` hook returns).

A LoRA merger file holds only ``model_dict.<DiffSynth layer name>.{weight_base, weight_lora, weight_cross,
weight_out, bias, norm_base.weight, norm_base.bias, norm_lora.weight, norm_lora.bias}`` (DiffSynth's
``FluxLoraPatcher``, no converter). It is claimed by those names (at least one ``blocks___N___`` or
``single_blocks___N___`` layer, nothing else in the file), built on the meta device and assigned strictly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffstudio.types import LoadRequest, ModelClaim

if TYPE_CHECKING:
    from diffstudio.loading import Checkpoint
    from torch import nn

FAMILY = "flux1"
COMPONENT = "lora_merger"
_PARTS = ("weight_base", "weight_lora", "weight_cross", "weight_out", "bias", "norm_base.weight", "norm_base.bias",
          "norm_lora.weight", "norm_lora.bias")  # fmt: skip


def claim_lora_fusion(checkpoint: Checkpoint) -> ModelClaim | None:
    """Claim a LoRAFusion file: every key is ``model_dict.<layer>.<part>`` with DiffSynth FLUX.1 layer names."""
    from diffstudio.dit.diffsynth_names import bfl_path

    keys = checkpoint.keys()
    if not keys or not all(k.startswith("model_dict.") for k in keys):
        return None
    layers = {k[len("model_dict.") :].split(".", 1)[0] for k in keys}
    if any(bfl_path(name) is None for name in layers):
        return None
    if any(f"model_dict.{name}.{part}" not in checkpoint.keys() for name in layers for part in _PARTS[:1]):
        return None
    return ModelClaim(FAMILY, "flux1-lora-fusion", COMPONENT, "diffsynth", load_lora_fusion)


def load_lora_fusion(checkpoint: Checkpoint, request: LoadRequest) -> nn.Module:
    """Build :class:`~diffstudio_lora_fusion.model.FluxLoraFusion` from a claimed checkpoint (strict)."""
    from diffstudio.loading import build_on_meta, load_state_dict_into

    from diffstudio_lora_fusion.model import FluxLoraFusion, dims_from_shapes

    keys = checkpoint.keys()
    dims = dims_from_shapes({k: checkpoint.shape(k) for k in keys if k.endswith(".weight_out")})
    model = build_on_meta(lambda: FluxLoraFusion(dims))
    load_state_dict_into(model, checkpoint.state_dict(keys), dtype=request.torch_dtype, device=request.device)
    return model.eval().requires_grad_(False)
