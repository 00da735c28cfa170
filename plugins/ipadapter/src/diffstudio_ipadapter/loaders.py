"""Claims for IP-Adapter checkpoints and their image encoders (names and shapes only).

* ``flux1-ipadapter/instantx``: ``image_proj.proj.0.weight`` + ``ip_adapter.{i}.to_k_ip.weight`` (the InstantX
  ``ip-adapter.bin`` is a pickle of ``{"image_proj": ..., "ip_adapter": ...}``; convert it once with
  :func:`convert_instantx_bin`, which flattens it to these safetensors keys);
* ``flux1-ipadapter/xlabs``: ``ip_adapter_proj_model.proj.weight`` +
  ``double_blocks.{i}.processor.ip_adapter_double_stream_k_proj.weight``;
* image encoders (transformers folders with ``config.json``): ``flux1-image-encoder/siglip``
  (``vision_model.head.*``, SigLIP's pooling head, no text tower) and ``flux1-image-encoder/clip``
  (``visual_projection.weight``: ``CLIPVisionModelWithProjection``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffstudio.errors import CheckpointError
from diffstudio.types import LoadRequest, ModelClaim

if TYPE_CHECKING:
    from diffstudio.loading import Checkpoint
    from torch import nn

FAMILY = "flux1"


def claim(checkpoint: Checkpoint) -> ModelClaim | None:
    """The plugin's answer to ``load_model``."""
    names = set(checkpoint.keys())
    if "image_proj.proj.0.weight" in names and "ip_adapter.0.to_k_ip.weight" in names:
        return ModelClaim(FAMILY, "flux1-ipadapter/instantx", "ipadapter", "instantx", load_adapter)
    if "ip_adapter_proj_model.proj.weight" in names and any(".ip_adapter_double_stream_k_proj." in n for n in names):
        return ModelClaim(FAMILY, "flux1-ipadapter/xlabs", "ipadapter", "xlabs", load_adapter)
    if any(n.startswith("text_model.") for n in names):
        return None
    if names & {"vision_model.embeddings.patch_embedding.weight", "embeddings.patch_embedding.weight"}:
        if any(n.startswith(("vision_model.head.", "head.attention.")) for n in names):
            return ModelClaim(FAMILY, "flux1-image-encoder/siglip", "ipadapter_image_encoder", "transformers",
                              load_image_encoder)  # fmt: skip
        if "visual_projection.weight" in names:
            return ModelClaim(FAMILY, "flux1-image-encoder/clip", "ipadapter_image_encoder", "transformers",
                              load_image_encoder)  # fmt: skip
    return None


def _count(names: set[str], pattern: str) -> int:
    found = {int(m.group(1)) for n in names if (m := re.match(pattern, n))}
    return max(found) + 1 if found else 0


def load_adapter(checkpoint: Checkpoint, request: LoadRequest) -> nn.Module:
    """Build :class:`~diffstudio_ipadapter.model.FluxIPAdapter` from a claimed file."""
    from diffstudio.loading import build_on_meta, load_state_dict_into

    from diffstudio_ipadapter.model import FluxIPAdapter

    names = set(checkpoint.keys())
    if "image_proj.proj.0.weight" in names:
        embed = checkpoint.shape("image_proj.proj.0.weight")[1]
        context = checkpoint.shape("image_proj.norm.weight")[0]
        tokens = checkpoint.shape("image_proj.proj.2.weight")[0] // context
        hidden = checkpoint.shape("ip_adapter.0.to_k_ip.weight")[0]
        args: tuple[Any, ...] = ("instantx", embed, context, hidden, tokens, _count(names, r"ip_adapter\.(\d+)\."))
    else:
        rows, embed = checkpoint.shape("ip_adapter_proj_model.proj.weight")
        context = checkpoint.shape("ip_adapter_proj_model.norm.weight")[0]
        hidden = checkpoint.shape("double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight")[0]
        args = ("xlabs", embed, context, hidden, rows // context, _count(names, r"double_blocks\.(\d+)\."))
    model = build_on_meta(lambda: FluxIPAdapter(*args))
    load_state_dict_into(model, checkpoint.state_dict(names), dtype=request.torch_dtype,
                         device=request.device)  # fmt: skip
    return model.eval().requires_grad_(False)


def load_image_encoder(checkpoint: Checkpoint, request: LoadRequest) -> Any:
    """Build the transformers vision model (SigLIP or CLIP with projection) from its folder's ``config.json``.

    Raises:
        CheckpointError: The folder has no ``config.json``.
    """
    from diffstudio.loading import build_on_meta, load_state_dict_into
    from diffstudio.startup import imports_without_gc

    with imports_without_gc():  # as for the families' text encoders (diffstudio.startup)
        from transformers import (
            CLIPVisionConfig,
            CLIPVisionModelWithProjection,
            SiglipVisionConfig,
            SiglipVisionModel,
        )

    config_path = Path(checkpoint.files[0]).parent / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"the image encoder {checkpoint.source} needs its config.json beside the weights")
    data = json.loads(config_path.read_text(encoding="utf-8"))
    siglip = any(k.startswith(("vision_model.head.", "head.attention.")) for k in checkpoint.keys())
    if siglip:
        config = SiglipVisionConfig(**data.get("vision_config", data))
        model = build_on_meta(lambda: SiglipVisionModel(config))
    else:
        config = CLIPVisionConfig(**data.get("vision_config", data))
        model = build_on_meta(lambda: CLIPVisionModelWithProjection(config))
    expected = set(model.state_dict())
    state = {}
    for key in checkpoint.keys():  # transformers 5 may save the vision tower without its "vision_model." prefix
        name = key if key in expected or f"vision_model.{key}" not in expected else f"vision_model.{key}"
        state[name] = checkpoint.tensor(key)
    load_state_dict_into(model, state, dtype=request.torch_dtype, device=request.device,
                         init_non_persistent=_init_buffers)  # fmt: skip
    # SigLIP's pooling head: nn.MultiheadAttention reads its in_proj and out_proj tensors in its own forward
    # (out_proj is a Linear whose forward is never called), so the whole attention is one leaf
    model.memory_leaves = ("MultiheadAttention", "*Linear", "*Embedding", "*LayerNorm", "*Conv2d")
    return model.eval().requires_grad_(False)


def _init_buffers(module: Any) -> None:
    import torch

    for sub in module.modules():
        ids = getattr(sub, "position_ids", None)
        if ids is not None and ids.is_meta:
            sub.register_buffer("position_ids", torch.arange(ids.shape[-1]).expand(ids.shape), persistent=False)


def convert_instantx_bin(source: str | Path, target: str | Path) -> Path:
    """Flatten InstantX's ``ip-adapter.bin`` (``{"image_proj": ..., "ip_adapter": ...}``) to safetensors.

    Loaded with ``torch.load(weights_only=True)`` (tensors only); the result is written atomically.
    """
    import torch
    from diffstudio._io import atomic_write_bytes
    from safetensors.torch import save

    nested = torch.load(str(source), map_location="cpu", weights_only=True)
    flat = {f"{group}.{k}": v.contiguous() for group in ("image_proj", "ip_adapter") for k, v in nested[group].items()}
    # core's atomic write: a temporary name in the same folder, renamed; the mode is the umask's (safetensors'
    # save_file would create the file 0600)
    return atomic_write_bytes(target, bytes(save(flat)))
