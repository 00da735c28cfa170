"""FLUX.1 prompt encoding: CLIP-L (pooled vector) and T5-XXL (token embeddings) through transformers.

As in BFL's and diffusers' FLUX.1 pipelines, a prompt is tokenized twice, with padding to a fixed length and
truncation and without an attention mask:

* CLIP (``text_encoder/``, ``tokenizer/``): 77 tokens; the pooled output is the final-norm hidden state at
  the end-of-text token (``CLIPTextModel.pooler_output``), ``(B, 768)``; it feeds ``vector_in``.
* T5 (``text_encoder_2/``, ``tokenizer_2/``): ``t5_sequence_length`` tokens (512; schnell was trained with
  256); ``last_hidden_state`` ``(B, L, 4096)`` feeds ``txt_in``; the text ids are zeros ``(B, L, 3)``.

Loading builds ``CLIPTextModel`` / ``T5EncoderModel`` on the meta device from the ``config.json`` beside the
weights and assigns the memory-mapped safetensors tensors, strict. CLIP loads from the legacy layout
(``text_model.*``, how the official FLUX.1 ``text_encoder/model.safetensors`` is stored) and from the
transformers-5 layout (no prefix); a ``text_projection`` is ignored. T5 loads from one file or shards, with
``shared.weight`` and ``encoder.embed_tokens.weight`` tied (either may be missing).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffstudio.errors import CheckpointError, PipelineInputError
from torch import Tensor, nn

from diffstudio_flux1.math import text_ids

if TYPE_CHECKING:
    from diffstudio.loading import Checkpoint

CLIP_MAX_LENGTH = 77
DEFAULT_T5_LENGTH = 512
_CLIP_PREFIXES = ("text_model.", "")
_CLIP_IGNORED = ("text_projection.", "logit_scale", "vision_model.", "visual_projection.")


class TextEncoderError(CheckpointError):
    """A text-encoder checkpoint cannot be used for FLUX.1 prompt encoding."""


class TokenizerConfigError(PipelineInputError):
    """A tokenizer folder is missing or cannot be read."""


# --- detection


def clip_prefix(keys: Iterable[str]) -> str | None:
    """The prefix (``"text_model."`` legacy, ``""`` transformers 5) of a CLIP text encoder, or None."""
    key_set = set(keys)
    for prefix in _CLIP_PREFIXES:
        needed = ("embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
                  "encoder.layers.0.self_attn.q_proj.weight", "final_layer_norm.weight")  # fmt: skip
        if all(prefix + name in key_set for name in needed):
            return prefix
    return None


def is_t5_encoder(keys: Iterable[str]) -> bool:
    """Whether the tensors are a T5 encoder (``T5EncoderModel``; a decoder, if present, is not used)."""
    key_set = set(keys)
    embed = "shared.weight" in key_set or "encoder.embed_tokens.weight" in key_set
    layers = ("encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.final_layer_norm.weight")
    return embed and all(name in key_set for name in layers)


# --- loading


def _open(source: Any) -> Checkpoint:
    from diffstudio.loading import Checkpoint

    return source if isinstance(source, Checkpoint) else Checkpoint.open(source)


def _read_config(checkpoint: Checkpoint, what: str, given: dict[str, Any] | None = None) -> dict[str, Any]:
    if given is not None:  # ModelConfig(config=...), already laid over the file beside the weights
        return dict(given)
    path = Path(checkpoint.files[0]).parent / "config.json"
    if not path.is_file():
        raise TextEncoderError(
            f"The {what} weights {checkpoint.source} have no config.json next to them ({path}). Pass the whole "
            f"folder (config.json + *.safetensors) from the model repository."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise TextEncoderError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise TextEncoderError(f"{path} does not hold a JSON object")
    return data


def load_clip_encoder(
    source: Any,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    config: dict[str, Any] | None = None,
) -> nn.Module:
    """Build ``transformers.CLIPTextModel`` from a ``text_encoder/`` folder or its files (either key layout).

    ``config`` (the fields of a ``config.json``) stands for the file beside the weights.

    Raises:
        TextEncoderError: Not a CLIP text encoder, or no ``config.json``.
        StrictLoadError: Missing, unexpected or mis-shaped tensors.
    """
    from diffstudio.loading import build_on_meta, load_state_dict_into
    from diffstudio.startup import imports_without_gc

    with imports_without_gc():
        from transformers import CLIPTextConfig, CLIPTextModel

    checkpoint = _open(source)
    keys = checkpoint.keys()
    prefix = clip_prefix(keys)
    if prefix is None:
        raise TextEncoderError(f"{checkpoint.source} is not a CLIP text encoder: {checkpoint.telling_keys()}")
    data = _read_config(checkpoint, "CLIP", config)
    config = CLIPTextConfig.from_dict(data.get("text_config", data))
    model = build_on_meta(lambda: CLIPTextModel(config))
    names = [k for k in keys if k.startswith(prefix) and not k[len(prefix) :].startswith(_CLIP_IGNORED)]
    names = [k for k in names if not k.endswith("position_ids")]  # a non-persistent buffer in old saves
    state = {k[len(prefix) :]: v for k, v in checkpoint.state_dict(names).items()}

    def positions(module: nn.Module) -> None:
        embeddings: Any = module.get_submodule("embeddings")
        embeddings.position_ids = torch.arange(config.max_position_embeddings).expand((1, -1))

    load_state_dict_into(model, state, dtype=torch_dtype, device=device, init_non_persistent=positions)
    # memory metadata for VRAM policies (diffstudio.vram.metadata); the classes are transformers'
    model.repeated_blocks = ("text_model.encoder.layers",)  # type: ignore[assignment]
    model.memory_leaves = (nn.Linear, nn.Embedding, nn.LayerNorm)  # type: ignore[assignment]
    model.keep_in_high_precision = ("*layer_norm*",)  # type: ignore[assignment]
    return model.eval().requires_grad_(False)


def load_t5_encoder(
    source: Any,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    config: dict[str, Any] | None = None,
) -> nn.Module:
    """Build ``transformers.T5EncoderModel`` from a ``text_encoder_2/`` folder (one file or shards).

    ``config`` (the fields of a ``config.json``) stands for the file beside the weights.

    Raises:
        TextEncoderError: Not a T5 encoder, or no ``config.json``.
        StrictLoadError: Missing, unexpected or mis-shaped tensors.
    """
    from diffstudio.loading import build_on_meta, load_state_dict_into
    from diffstudio.startup import imports_without_gc

    with imports_without_gc():
        from transformers import T5Config, T5EncoderModel

    checkpoint = _open(source)
    keys = checkpoint.keys()
    if not is_t5_encoder(keys):
        raise TextEncoderError(f"{checkpoint.source} is not a T5 encoder: {checkpoint.telling_keys()}")
    t5_config = T5Config.from_dict(_read_config(checkpoint, "T5", config))
    model = build_on_meta(lambda: T5EncoderModel(t5_config))
    names = [k for k in keys if k.startswith(("shared.", "encoder."))]
    state = checkpoint.state_dict(names)
    for a, b in (("shared.weight", "encoder.embed_tokens.weight"), ("encoder.embed_tokens.weight", "shared.weight")):
        if a not in state and b in state:
            state[a] = state[b]
    load_state_dict_into(model, state, dtype=torch_dtype, device=device)
    model.encoder.embed_tokens = model.shared  # keep the tie
    # memory metadata for VRAM policies; `shared` is `encoder.embed_tokens` (one module): one leaf, streamed
    model.repeated_blocks = ("encoder.block",)  # type: ignore[assignment]
    model.memory_leaves = (nn.Linear, nn.Embedding, "T5LayerNorm")  # type: ignore[assignment]
    model.keep_in_high_precision = ("*layer_norm*", "*relative_attention_bias*")  # type: ignore[assignment]
    return model.eval().requires_grad_(False)


# --- tokenizers


def load_tokenizer(source: str | os.PathLike[str] | None, kind: str) -> Any:
    """Load a tokenizer folder offline with ``AutoTokenizer``.

    Args:
        source: The ``tokenizer/`` (CLIP) or ``tokenizer_2/`` (T5) folder, or a file inside it.
        kind: ``"clip"`` or ``"t5"``, for messages.

    Raises:
        TokenizerConfigError: No folder, no tokenizer files, or a folder transformers cannot read.
    """
    folder = "tokenizer/" if kind == "clip" else "tokenizer_2/"
    hint = f"Pass tokenizer_{1 if kind == 'clip' else 2}_config=ModelConfig(..., origin_file_pattern='{folder}')."
    if source is None:
        raise TokenizerConfigError(f"No {kind.upper()} tokenizer was given. {hint}")
    path = Path(source)
    path = path.parent if path.is_file() else path
    if not path.is_dir():
        raise TokenizerConfigError(f"The tokenizer folder {str(path)!r} does not exist. {hint}")
    from diffstudio.startup import imports_without_gc

    try:
        with imports_without_gc():  # transformers, and the tokenizer class's module
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many types (OSError, ValueError, ...)
        raise TokenizerConfigError(f"The {kind} tokenizer in {str(path)!r} could not be loaded: {exc}. {hint}") from exc


# --- prompt encoding


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


@dataclass
class PromptEmbeddings:
    """What the DiT needs from a batch of prompts.

    Attributes:
        txt: T5 token embeddings ``(B, L, 4096)``.
        txt_ids: Their ids, zeros ``(B, L, 3)``.
        y: Pooled CLIP vectors ``(B, 768)``.
    """

    txt: Tensor
    txt_ids: Tensor
    y: Tensor


class PromptEncoder:
    """CLIP + T5 prompt encoder over loaded models and tokenizers (see the module docstring)."""

    def __init__(self, clip: nn.Module, clip_tokenizer: Any, t5: nn.Module, t5_tokenizer: Any) -> None:
        self.clip, self.clip_tokenizer = clip, clip_tokenizer
        self.t5, self.t5_tokenizer = t5, t5_tokenizer

    def pooled(self, prompts: Sequence[str]) -> Tensor:
        """CLIP pooled output at the end-of-text token, ``(B, 768)``."""
        tokens = self.clip_tokenizer(
            list(prompts), padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt"
        )
        device, _ = _device_dtype(self.clip)
        out: Tensor = self.clip(tokens.input_ids.to(device), output_hidden_states=False).pooler_output
        return out

    def tokens(self, prompts: Sequence[str], length: int = DEFAULT_T5_LENGTH) -> Tensor:
        """T5 ``last_hidden_state`` of ``length`` padded tokens, ``(B, length, 4096)``."""
        ids = self.t5_tokenizer(
            list(prompts), padding="max_length", max_length=int(length), truncation=True, return_tensors="pt"
        ).input_ids
        device, _ = _device_dtype(self.t5)
        out: Tensor = self.t5(ids.to(device), output_hidden_states=False)[0]
        return out

    def encode(self, prompts: Sequence[str], length: int = DEFAULT_T5_LENGTH) -> PromptEmbeddings:
        """Both encoders on a batch of prompts."""
        txt = self.tokens(prompts, length)
        return PromptEmbeddings(txt, text_ids(txt.shape[0], txt.shape[1], device=txt.device), self.pooled(prompts))
