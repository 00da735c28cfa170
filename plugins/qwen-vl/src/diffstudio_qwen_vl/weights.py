"""Qwen2.5-VL weights: recognise a checkpoint (either key layout) and build ``transformers.Qwen2_5_VLModel`` from it.

Three key layouts load, all through the same renaming:

* ``"transformers5"``: ``model.language_model.*``, ``model.visual.*``, ``lm_head.*`` (what
  ``Qwen2_5_VLForConditionalGeneration`` writes since transformers 4.52);
* ``"legacy"``: ``model.layers.*``, ``model.embed_tokens.*``, ``model.norm.*``, ``visual.*``, ``lm_head.*`` (the
  pre-4.52 layout of the official ``Qwen/Qwen2.5-VL-7B-Instruct`` files and of Nexus-Gen's AR model);
* ``"model"``: ``language_model.*``, ``visual.*`` (what a bare ``Qwen2_5_VLModel`` writes).

Keys are renamed with the class's own checkpoint conversion mapping (transformers'
``get_checkpoint_conversion_mapping("Qwen2_5_VLForConditionalGeneration")``: ``^visual`` -> ``model.visual``,
``^model`` -> ``model.language_model``), then ``model.`` is stripped to reach ``Qwen2_5_VLModel``'s names. The LM
head is never read (both users take hidden states). Top-level tensors that belong to a model built around the
VLM (Nexus-Gen's ``vision_head.*`` / ``image_prefill_embeds.*``) are left out when their prefixes are passed as
``ignore_prefixes`` (the caller reads them itself with :meth:`~diffstudio.loading.Checkpoint.state_dict`).

Loading builds the model on the meta device from the ``config.json`` beside the weights (or ``config=``) and
assigns the memory-mapped safetensors tensors, strict; RoPE tables (non-persistent buffers) are rebuilt where the
weights live. The model carries the memory metadata that diffstudio's VRAM policies read
(:mod:`diffstudio.vram.metadata`), so offload, disk streaming and fp8 storage work as for any component.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffstudio.errors import CheckpointError
from torch import nn

if TYPE_CHECKING:
    from diffstudio.loading import Checkpoint

__all__ = [
    "LAYOUTS",
    "QwenVLCheckpointError",
    "is_qwen_vl",
    "load_qwen_vl",
    "model_names",
    "qwen_vl_layout",
]

LAYOUTS: dict[str, tuple[str, str]] = {
    "transformers5": ("model.language_model.", "model.visual."),
    "legacy": ("model.", "visual."),
    "model": ("language_model.", "visual."),
}
"""Layout name -> (prefix of the text decoder, prefix of the vision tower)."""

_TEXT_PROBES = ("embed_tokens.weight", "layers.0.self_attn.q_proj.weight", "layers.0.mlp.gate_proj.weight")
_VISION_PROBES = ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "merger.mlp.0.weight")
_HEAD = "lm_head."


class QwenVLCheckpointError(CheckpointError):
    """A checkpoint or its config cannot be used as a Qwen2.5-VL model."""


def qwen_vl_layout(keys: Iterable[str]) -> str | None:
    """Which Qwen2.5-VL key layout the tensors use (see the module docstring), or None when they are not one.

    A Qwen2.5-VL has a Qwen2 text decoder (no ``q_norm``: that would be Qwen3) and a vision tower with a 3-D patch
    embedding, fused ``attn.qkv`` and a patch ``merger``.
    """
    key_set = set(keys)
    for layout, (text, vision) in LAYOUTS.items():
        if all(text + p in key_set for p in _TEXT_PROBES) and all(vision + p in key_set for p in _VISION_PROBES):
            if f"{text}layers.0.self_attn.q_norm.weight" in key_set:
                return None
            return layout
    return None


def is_qwen_vl(keys: Iterable[str]) -> bool:
    """Whether the tensors are a Qwen2.5-VL model (any layout of :data:`LAYOUTS`)."""
    return qwen_vl_layout(keys) is not None


def model_names(keys: Iterable[str], ignore_prefixes: Sequence[str] = ()) -> dict[str, str]:
    """Checkpoint name -> ``Qwen2_5_VLModel`` name, through transformers' conversion mapping of the class.

    ``lm_head.*`` and names starting with one of ``ignore_prefixes`` are left out.
    """
    from diffstudio.startup import imports_without_gc

    with imports_without_gc():
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    transforms = get_checkpoint_conversion_mapping("Qwen2_5_VLForConditionalGeneration") or []
    skipped = (_HEAD, *ignore_prefixes)
    out: dict[str, str] = {}
    for key in keys:
        if key.startswith(skipped):
            continue
        name = key
        for transform in transforms:
            name, matched = transform.rename_source_key(name)
            if matched is not None:
                break
        out[key] = name.removeprefix("model.")
    return out


def _open(source: Any) -> Checkpoint:
    from diffstudio.loading import Checkpoint

    return source if isinstance(source, Checkpoint) else Checkpoint.open(source)


def _read_config(checkpoint: Checkpoint, config: Any) -> dict[str, Any]:
    """The model config: given (a dict, a ``PretrainedConfig``, a path), else ``config.json`` beside the weights."""
    if config is not None and not isinstance(config, (str, os.PathLike)):
        return dict(config.to_dict() if hasattr(config, "to_dict") else config)
    path = Path(config) if config is not None else Path(checkpoint.files[0]).parent / "config.json"
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise QwenVLCheckpointError(
            f"The Qwen2.5-VL weights {checkpoint.source} have no config.json next to them ({path}); pass the whole "
            f"model folder (config.json + *.safetensors) or ModelConfig(config=<path to config.json>)."
        )
    from diffstudio._io import read_json

    try:
        data = read_json(path)
    except ValueError as exc:
        raise QwenVLCheckpointError(f"{path} is not valid JSON ({exc}); restore the model's config.json") from exc
    if not isinstance(data, dict):
        raise QwenVLCheckpointError(f"{path} does not hold a JSON object; restore the model's config.json")
    return data


def _rebuild_rotary(module: nn.Module) -> None:
    """Recreate the RoPE tables (non-persistent ``inv_freq`` buffers, text and vision) where the weights now live."""
    for name, child in list(module.named_modules()):
        if name and "inv_freq" in dict(child.named_buffers(recurse=False)):
            parent_name, _, attribute = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attribute, type(child)(config=child.config))


def load_qwen_vl(
    source: Any,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    *,
    config: Any = None,
    ignore_prefixes: Sequence[str] = (),
) -> nn.Module:
    """Build ``transformers.Qwen2_5_VLModel`` (text decoder + vision tower, no LM head) from safetensors files.

    Args:
        source: The model folder, a list of its ``*.safetensors`` files (``config.json`` beside them), an index
            file, a glob, or an open :class:`~diffstudio.loading.Checkpoint`; any layout of :data:`LAYOUTS`.
        torch_dtype: Floating-point dtype of the weights (None keeps the file's).
        device: Where the weights go (None: they stay memory-mapped on CPU).
        config: A ``config.json`` path, dict or ``Qwen2_5_VLConfig`` instead of the file beside the weights.
        ignore_prefixes: Top-level tensor-name prefixes that belong to a surrounding model, not to the VLM.

    Returns:
        The model in eval mode without gradients. ``model(input_ids, attention_mask, pixel_values=...,
        image_grid_thw=...).last_hidden_state`` is ``(B, L, hidden)``; ``model.get_input_embeddings()``,
        ``model.get_image_features``, ``model.get_rope_index`` and ``model.visual`` / ``model.language_model`` are
        transformers' own.

    Raises:
        QwenVLCheckpointError: Not a Qwen2.5-VL checkpoint, or no readable config.
        StrictLoadError: Missing, unexpected or mis-shaped tensors.
    """
    from diffstudio.loading import build_on_meta, load_state_dict_into
    from diffstudio.startup import imports_without_gc

    with imports_without_gc():
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

    checkpoint = _open(source)
    keys = checkpoint.keys()
    if qwen_vl_layout(keys) is None:
        raise QwenVLCheckpointError(
            f"{checkpoint.source} is not a Qwen2.5-VL checkpoint (telling keys: "
            f"{', '.join(checkpoint.telling_keys())}); pass the Qwen2.5-VL model folder's *.safetensors files."
        )
    cfg = Qwen2_5_VLConfig.from_dict(_read_config(checkpoint, config))
    with imports_without_gc():
        model = build_on_meta(lambda: Qwen2_5_VLModel(cfg))
    rename = model_names(keys, ignore_prefixes)
    tensors = checkpoint.state_dict(list(rename))
    state = {rename[k]: v for k, v in tensors.items()}
    rebuild, source = _rebuild_rotary, str(checkpoint.source)
    load_state_dict_into(model, state, dtype=torch_dtype, device=device, init_non_persistent=rebuild, source=source)
    add_memory_metadata(model)
    return model.eval().requires_grad_(False)


def add_memory_metadata(model: nn.Module) -> None:
    """Declare the VRAM-policy metadata of a ``Qwen2_5_VLModel`` (blocks, leaves, high-precision tensors)."""
    model.repeated_blocks = ("visual.blocks", "language_model.layers")  # type: ignore[assignment]
    model.memory_leaves = (nn.Linear, nn.Embedding, nn.Conv3d, "*RMSNorm")  # type: ignore[assignment]
    model.keep_in_high_precision = ("*norm*", "*ln_q*")  # type: ignore[assignment]
