"""FLUX.2 text-encoder weights: recognise Qwen3 (klein) and Mistral3 (dev) checkpoints and build their decoders.

Loading builds only the decoder (``Qwen3Model`` / the Mistral text model) on the meta device and assigns the
memory-mapped safetensors tensors, strict: the LM head and, for Mistral3, the Pixtral vision tower and the
projector are never read, and by default the decoder layers after the deepest requested hidden state are not
built (their outputs cannot change the requested states). Both Mistral3 key layouts load: transformers >= 4.52
(``model.language_model.*``, ``model.vision_tower.*``, ``lm_head.*``) and the legacy one written by older
versions (``language_model.model.*``, ``vision_tower.*``, ``language_model.lm_head.*``).

Prompt encoding with these models is :mod:`diffstudio_flux2.prompt_encoders`; :mod:`diffstudio_flux2.text_encoders`
re-exports both halves.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from diffstudio.errors import CheckpointError
from torch import nn

if TYPE_CHECKING:
    from diffstudio.loading import Checkpoint
    from transformers import PretrainedConfig

__all__ = [
    "DEFAULT_MAX_SEQUENCE_LENGTH",
    "MISTRAL3_LAYERS",
    "MISTRAL3_SYSTEM_MESSAGE",
    "QWEN3_LAYERS",
    "TextEncoderError",
    "TextEncoderMismatchError",
    "check_context_width",
    "is_mistral3_text_encoder",
    "is_qwen3_text_encoder",
    "load_mistral3_encoder",
    "load_qwen3_encoder",
    "mistral3_layout",
    "text_hidden_size",
]

QWEN3_LAYERS: tuple[int, ...] = (9, 18, 27)
MISTRAL3_LAYERS: tuple[int, ...] = (10, 20, 30)
DEFAULT_MAX_SEQUENCE_LENGTH = 512

# BFL's system turn for FLUX.2-dev prompt encoding (a fixed model input; it must match the reference exactly).
MISTRAL3_SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object "
    "relationships, object\nattribution and actions without speculation."
)

_QWEN3_PREFIXES = ("model.", "")
_MISTRAL3_LAYOUTS = {"transformers5": "model.language_model.", "legacy": "language_model.model."}
_MISTRAL3_IGNORED = (
    "lm_head.",
    "language_model.lm_head.",
    "model.vision_tower.",
    "vision_tower.",
    "model.multi_modal_projector.",
    "multi_modal_projector.",
)
_LAYER_RE = re.compile(r"^layers\.(\d+)\.")


# ----------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------


class TextEncoderError(CheckpointError):
    """A text-encoder checkpoint cannot be used for FLUX.2 prompt encoding."""


class TextEncoderMismatchError(TextEncoderError):
    """The text encoder's prompt-embedding width differs from the DiT's context width."""


# ----------------------------------------------------------------------------------------------------
# detection (key patterns and shapes, no tensor data)
# ----------------------------------------------------------------------------------------------------


def _has(keys: set[str], *names: str) -> bool:
    return all(name in keys for name in names)


def _qwen3_prefix(keys: set[str], shapes: Mapping[str, Sequence[int]]) -> str | None:
    """The prefix (``"model."`` or ``""``) under which a Qwen3 decoder is stored, or None."""
    if any("vision" in k or "visual" in k or k.startswith("language_model.") for k in keys):
        return None
    for prefix in _QWEN3_PREFIXES:
        attn = f"{prefix}layers.0.self_attn."
        embed, q_proj = f"{prefix}embed_tokens.weight", attn + "q_proj.weight"
        q_norm, k_norm = attn + "q_norm.weight", attn + "k_norm.weight"
        if not _has(keys, embed, q_norm, k_norm, q_proj, f"{prefix}layers.0.mlp.gate_proj.weight"):
            continue
        e, qn, qp = (tuple(shapes.get(n, ())) for n in (embed, q_norm, q_proj))
        if len(e) == 2 and len(qn) == 1 and len(qp) == 2 and qp[1] == e[1] and qp[0] % qn[0] == 0:
            return prefix
    return None


def is_qwen3_text_encoder(keys: Iterable[str], shapes: Mapping[str, Sequence[int]]) -> bool:
    """Whether the tensors are a Qwen3 decoder (``Qwen3ForCausalLM`` or ``Qwen3Model`` layout).

    Qwen3 is recognised by per-head RMSNorms on queries and keys (``self_attn.q_norm`` / ``k_norm``, shape
    ``(head_dim,)``) in a Llama-style decoder with a 2-D ``embed_tokens`` of shape ``(vocab, hidden)``.

    Args:
        keys: Tensor names.
        shapes: Tensor name -> shape (at least for the names above).
    """
    return _qwen3_prefix(set(keys), shapes) is not None


def mistral3_layout(keys: Iterable[str], shapes: Mapping[str, Sequence[int]]) -> str | None:
    """Which Mistral3 key layout the tensors use: ``"transformers5"``, ``"legacy"``, or None if neither.

    ``"transformers5"`` is ``model.language_model.*`` (written by transformers >= 4.52), ``"legacy"`` is
    ``language_model.model.*`` (older versions). The text decoder has no q/k norms (unlike Qwen3).
    """
    key_set = set(keys)
    if any(k.startswith(("model.visual.", "visual.")) for k in key_set):  # a Qwen2.5-VL (diffstudio-qwen-vl)
        return None
    for layout, prefix in _MISTRAL3_LAYOUTS.items():
        embed, q_proj = f"{prefix}embed_tokens.weight", f"{prefix}layers.0.self_attn.q_proj.weight"
        if not _has(key_set, embed, q_proj, f"{prefix}layers.0.mlp.gate_proj.weight"):
            continue
        if f"{prefix}layers.0.self_attn.q_norm.weight" in key_set:
            continue
        e, qp = tuple(shapes.get(embed, ())), tuple(shapes.get(q_proj, ()))
        if len(e) == 2 and len(qp) == 2 and qp[1] == e[1]:
            return layout
    return None


def is_mistral3_text_encoder(keys: Iterable[str], shapes: Mapping[str, Sequence[int]]) -> bool:
    """Whether the tensors are a ``Mistral3ForConditionalGeneration`` (either key layout)."""
    return mistral3_layout(keys, shapes) is not None


def text_hidden_size(keys: Iterable[str], shapes: Mapping[str, Sequence[int]]) -> int:
    """Hidden size ``D`` of a Qwen3 or Mistral3 text encoder (its prompt embeddings are ``3 * D`` wide).

    Raises:
        TextEncoderError: the tensors are neither a Qwen3 nor a Mistral3 text encoder.
    """
    key_set = set(keys)
    qwen = _qwen3_prefix(key_set, shapes)
    if qwen is not None:
        return int(shapes[f"{qwen}embed_tokens.weight"][1])
    layout = mistral3_layout(key_set, shapes)
    if layout is not None:
        return int(shapes[f"{_MISTRAL3_LAYOUTS[layout]}embed_tokens.weight"][1])
    raise TextEncoderError(
        "The tensors are neither a Qwen3 nor a Mistral3 text encoder (no 'embed_tokens.weight' with Qwen3 "
        "'self_attn.q_norm' or Mistral3 'language_model' layers). Pass the text_encoder/*.safetensors files."
    )


def check_context_width(encoder_width: int, dit_joint_dim: int) -> None:
    """Check that prompt embeddings (``3 * hidden`` wide) fit the DiT's context projection (``txt_in``).

    Args:
        encoder_width: Width of the prompt embeddings, ``len(layers) * hidden``.
        dit_joint_dim: The DiT's context width (``context_in_dim``, diffusers' ``joint_attention_dim``).

    Raises:
        TextEncoderMismatchError: the widths differ, with the likely cause.
    """
    if int(encoder_width) != int(dit_joint_dim):
        raise TextEncoderMismatchError(
            f"The text encoder produces {encoder_width}-wide prompt embeddings but the DiT expects "
            f"{dit_joint_dim}. The text encoder belongs to another FLUX.2 variant (klein-4B uses Qwen3-4B: "
            f"7680, klein-9B uses Qwen3-8B: 12288, dev uses Mistral-Small: 15360); load the text_encoder "
            f"files from the same repository as the transformer."
        )


# ----------------------------------------------------------------------------------------------------
# loading the decoders
# ----------------------------------------------------------------------------------------------------


def _open(source: Any) -> Checkpoint:
    from diffstudio.loading import Checkpoint

    return source if isinstance(source, Checkpoint) else Checkpoint.open(source)


def _read_config(checkpoint: Checkpoint, config: Any, what: str) -> dict[str, Any]:
    """The model config as a dict: given, or ``config.json`` next to the (first) weight file."""
    if config is not None and not isinstance(config, (str, os.PathLike)):
        return dict(config.to_dict() if hasattr(config, "to_dict") else config)
    path = Path(config) if config is not None else checkpoint.files[0].parent / "config.json"
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise TextEncoderError(
            f"The {what} weights {checkpoint.source} have no config.json next to them ({path}). Pass the "
            f"whole text_encoder/ folder (config.json + *.safetensors) or config=<path to config.json>."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise TextEncoderError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise TextEncoderError(f"{path} does not hold a JSON object.")
    return data


def _trim(config: PretrainedConfig, layers: Sequence[int] | None) -> int:
    """Shrink ``config`` to the layers that the requested hidden states depend on; return the layer count.

    ``hidden_states[k]`` is the output of decoder layer ``k`` (``[0]`` is the embeddings); the last entry is
    replaced by the final-norm output, so one layer more than the deepest request is kept.
    """
    total = int(config.num_hidden_layers)
    if layers:
        deepest = max(layers)
        if deepest > total or min(layers) < 0:
            raise TextEncoderError(
                f"Hidden states {tuple(layers)} were requested but the text encoder has only {total} layers "
                f"(valid: 0..{total}). The checkpoint is not a FLUX.2 text encoder."
            )
        total = min(total, deepest + 1)
    config.num_hidden_layers = total
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:total]
    return total


def _assign(
    model: nn.Module,
    checkpoint: Checkpoint,
    rename: dict[str, str],
    layers_kept: int,
    torch_dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> None:
    """Assign the checkpoint tensors named by ``rename`` (checkpoint -> module name), strict."""
    from diffstudio.loading import load_state_dict_into

    wanted: dict[str, str] = {}
    for ckpt_name, name in rename.items():
        match = _LAYER_RE.match(name)
        if match is None or int(match.group(1)) < layers_kept:
            wanted[ckpt_name] = name
    tensors = checkpoint.state_dict(list(wanted))
    state = {wanted[k]: v for k, v in tensors.items()}

    def rebuild_rotary(module: nn.Module) -> None:
        # RoPE frequencies are non-persistent buffers: recreate them where the weights now live.
        for owner in list(module.modules()):
            rotary = getattr(owner, "rotary_emb", None)
            if isinstance(rotary, nn.Module):
                owner.rotary_emb = type(rotary)(config=module.config)

    load_state_dict_into(model, state, dtype=torch_dtype, device=device, init_non_persistent=rebuild_rotary)
    model.eval().requires_grad_(False)
    # memory metadata for VRAM policies (diffstudio.vram.metadata); the decoder classes are transformers'
    model.repeated_blocks = ("layers",)  # type: ignore[assignment]
    model.memory_leaves = (nn.Linear, nn.Embedding, "*RMSNorm")  # type: ignore[assignment]
    model.keep_in_high_precision = ("norm.*", "*_norm.*", "*layernorm*")  # type: ignore[assignment]


def load_qwen3_encoder(
    source: Any,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    *,
    config: Any = None,
    layers: Sequence[int] | None = QWEN3_LAYERS,
) -> nn.Module:
    """Build the Qwen3 decoder of a FLUX.2-klein text encoder from safetensors files.

    Args:
        source: The ``text_encoder/`` folder, a list of its ``*.safetensors`` files (``config.json`` must lie
            next to them), an index file, a glob, or an open :class:`~diffstudio.loading.Checkpoint`.
            ``Qwen3ForCausalLM`` (``model.*``) and ``Qwen3Model`` (no prefix) layouts both load.
        torch_dtype: Floating-point dtype of the weights (None keeps the file's).
        device: Where the weights go (None: stays memory-mapped on CPU).
        config: ``config.json`` path, dict or ``Qwen3Config`` instead of the file next to the weights.
        layers: Hidden states that will be read; layers after ``max(layers) + 1`` are not built. None builds
            all layers.

    Returns:
        A ``transformers.Qwen3Model`` in eval mode without gradients; ``hidden_states`` of its output have
        shape ``(B, L, hidden)``.

    Raises:
        TextEncoderError: not a Qwen3 checkpoint, missing config, too few layers.
        StrictLoadError: missing, unexpected or mis-shaped tensors.
    """
    from diffstudio.loading import build_on_meta
    from diffstudio.startup import imports_without_gc

    with imports_without_gc():
        from transformers import Qwen3Config, Qwen3Model

    checkpoint = _open(source)
    keys = checkpoint.keys()
    shapes = {k: checkpoint.shape(k) for k in keys if k.endswith(("embed_tokens.weight", "q_norm.weight",
                                                                     "q_proj.weight"))}  # fmt: skip
    prefix = _qwen3_prefix(set(keys), shapes)
    if prefix is None:
        raise TextEncoderError(
            f"{checkpoint.source} is not a Qwen3 text encoder (telling keys: {', '.join(checkpoint.telling_keys())})."
        )
    cfg = Qwen3Config.from_dict(_read_config(checkpoint, config, "Qwen3"))
    kept = _trim(cfg, layers)
    with imports_without_gc():
        model = build_on_meta(lambda: Qwen3Model(cfg))
    rename = {k: k[len(prefix) :] for k in keys if k.startswith(prefix) and k != "lm_head.weight"}
    _assign(model, checkpoint, rename, kept, torch_dtype, device)
    return model


def load_mistral3_encoder(
    source: Any,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    *,
    config: Any = None,
    layers: Sequence[int] | None = MISTRAL3_LAYERS,
) -> nn.Module:
    """Build the text decoder of a FLUX.2-dev ``Mistral3ForConditionalGeneration`` from safetensors files.

    The vision tower, the multimodal projector and the LM head are skipped (never read): prompts are text.

    Args:
        source: The ``text_encoder/`` folder, a list of its ``*.safetensors`` files (``config.json`` of the
            Mistral3 model next to them), an index file, a glob, or an open Checkpoint. Both key layouts load
            (``model.language_model.*`` and the legacy ``language_model.model.*``).
        torch_dtype: Floating-point dtype of the weights (None keeps the file's).
        device: Where the weights go (None: stays memory-mapped on CPU).
        config: ``config.json`` path, dict or ``Mistral3Config`` instead of the file next to the weights.
        layers: Hidden states that will be read; later layers are not built. None builds all layers.

    Returns:
        The text model (``AutoModel`` of ``config.text_config``, e.g. ``MistralModel``) in eval mode without
        gradients; it yields the same hidden states as the full Mistral3 model on text-only input.

    Raises:
        TextEncoderError: not a Mistral3 checkpoint, missing config, too few layers.
        StrictLoadError: missing, unexpected or mis-shaped tensors.
    """
    from diffstudio.loading import build_on_meta
    from diffstudio.startup import imports_without_gc

    with imports_without_gc():
        from transformers import AutoModel, Mistral3Config, PretrainedConfig

    checkpoint = _open(source)
    keys = checkpoint.keys()
    shapes = {k: checkpoint.shape(k) for k in keys if k.endswith(("embed_tokens.weight", "q_proj.weight"))}
    layout = mistral3_layout(keys, shapes)
    if layout is None:
        raise TextEncoderError(
            f"{checkpoint.source} is not a Mistral3 text encoder (telling keys: "
            f"{', '.join(checkpoint.telling_keys())})."
        )
    prefix = _MISTRAL3_LAYOUTS[layout]
    text_cfg = Mistral3Config.from_dict(_read_config(checkpoint, config, "Mistral3")).text_config
    if not isinstance(text_cfg, PretrainedConfig):
        raise TextEncoderError(f"The config of {checkpoint.source} has no Mistral3 text_config.")
    kept = _trim(text_cfg, layers)
    with imports_without_gc():  # AutoModel imports the modelling module here
        model = cast(nn.Module, build_on_meta(lambda: AutoModel.from_config(text_cfg)))  # type: ignore[no-untyped-call]
    rename = {k: k[len(prefix) :] for k in keys if k.startswith(prefix)}
    rename.update({k: k for k in keys if not k.startswith(prefix) and not k.startswith(_MISTRAL3_IGNORED)})
    _assign(model, checkpoint, rename, kept, torch_dtype, device)
    return model
