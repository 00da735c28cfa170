"""FLUX.2 prompt encoding: Qwen3 (klein) and Mistral3 (dev) through transformers.

FLUX.2 conditions its DiT on intermediate hidden states of a chat language model. A prompt is wrapped in the
model's chat template, tokenized to a fixed length (padding ``"max_length"`` with truncation, 512 by default),
run through the decoder with its attention mask, and three hidden states are stacked per token:

* klein (Qwen3-4B / Qwen3-8B): one user turn, ``add_generation_prompt=True`` and ``enable_thinking=False``
  (an empty think block ends the text); hidden states ``(9, 18, 27)``; context width ``3 * hidden``
  (7680 for 4B, 12288 for 8B).
* dev (Mistral-Small-3.x, ``Mistral3ForConditionalGeneration``): a system turn with BFL's fixed system
  message, then the user turn with ``[IMG]`` removed; hidden states ``(10, 20, 30)``; width ``3 * 5120``.

The stacked states ``(B, 3, L, D)`` become ``(B, L, 3 * D)`` (per token: layer-major, channel-minor), and the
text position ids are ``(t, h, w, l) = (0, 0, 0, l)``. This is what diffusers' ``Flux2KleinPipeline`` and
``Flux2Pipeline`` compute; the tests prove equality on tiny models.

Loading builds only the decoder (``Qwen3Model`` / the Mistral text model) on the meta device and assigns the
memory-mapped safetensors tensors, strict: the LM head and, for Mistral3, the Pixtral vision tower and the
projector are never read, and by default the decoder layers after the deepest requested hidden state are not
built (their outputs cannot change the requested states). Both Mistral3 key layouts load: transformers >= 4.52
(``model.language_model.*``, ``model.vision_tower.*``, ``lm_head.*``) and the legacy one written by older
versions (``language_model.model.*``, ``vision_tower.*``, ``language_model.lm_head.*``).

Tokenizers load offline from a folder with ``AutoTokenizer``. The official dev ``tokenizer/`` folder describes
a ``PixtralProcessor``; for text it only forwards to its tokenizer, so the tokenizer half is loaded (no
torchvision needed). Any object with ``apply_chat_template`` (a processor included) may be passed instead.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from diffstudio.errors import CheckpointError, PipelineInputError
from torch import Tensor, nn

from diffstudio_flux2.math import text_ids as _text_ids
from diffstudio_flux2.tokenizers import TokenizerConfigError, load_tokenizer

if TYPE_CHECKING:
    from diffstudio.loading import Checkpoint
    from transformers import PretrainedConfig

__all__ = [
    "DEFAULT_MAX_SEQUENCE_LENGTH",
    "MISTRAL3_LAYERS",
    "MISTRAL3_SYSTEM_MESSAGE",
    "QWEN3_LAYERS",
    "Mistral3PromptEncoder",
    "PromptEncoder",
    "Qwen3PromptEncoder",
    "TextEncoderError",
    "TextEncoderMismatchError",
    "TokenizerConfigError",
    "check_context_width",
    "is_mistral3_text_encoder",
    "is_qwen3_text_encoder",
    "load_mistral3_encoder",
    "load_qwen3_encoder",
    "load_tokenizer",
    "mistral3_layout",
    "prompt_text_ids",
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


# ----------------------------------------------------------------------------------------------------
# prompt encoders
# ----------------------------------------------------------------------------------------------------


def prompt_text_ids(batch: int, length: int, device: torch.device | str | None = None) -> Tensor:
    """Text position ids ``(t, h, w, l) = (0, 0, 0, l)``, int64, shape ``(B, L, 4)``."""
    return _text_ids(batch, length, device=device).contiguous()


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    for tensor in model.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


class PromptEncoder:
    """Base class: chat template -> fixed-length tokens -> stacked hidden states.

    Attributes:
        model: A transformers decoder (or a model wrapping one) accepting ``input_ids``, ``attention_mask``,
            ``output_hidden_states`` and ``use_cache``.
        tokenizer: A tokenizer or processor with a chat template.
        layers: Indices into ``hidden_states`` that are stacked.
        execution_device: Where the tokens are sent (None: the device of the model's first parameter; set it
            when the weights are offloaded and moved in by hooks).
    """

    kind = "text"
    default_layers: tuple[int, ...] = ()

    def __init__(self, model: nn.Module, tokenizer: Any, layers: Sequence[int] | None = None) -> None:
        if tokenizer is None or not hasattr(tokenizer, "apply_chat_template"):
            raise TokenizerConfigError(
                f"The {self.kind} prompt encoder needs a tokenizer with a chat template; pass "
                f"tokenizer_config=ModelConfig(..., origin_file_pattern='tokenizer/')."
            )
        self.model = model
        self.tokenizer = tokenizer
        self.layers = tuple(layers) if layers is not None else self.default_layers
        self.execution_device: torch.device | None = None
        config = getattr(model, "config", None)
        config = getattr(config, "text_config", None) or config
        self.hidden_size = int(getattr(config, "hidden_size", 0))

    @property
    def width(self) -> int:
        """Width of one prompt-embedding token: ``len(layers) * hidden_size``."""
        return len(self.layers) * self.hidden_size

    def tokenize(self, prompts: list[str], max_sequence_length: int) -> tuple[Tensor, Tensor]:
        """Return ``input_ids`` and ``attention_mask``, both ``(B, max_sequence_length)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement tokenize()")

    @torch.no_grad()
    def encode(
        self,
        prompts: str | list[str],
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Encode prompts as FLUX.2 expects them.

        Args:
            prompts: One prompt or a batch of ``B`` prompts.
            max_sequence_length: Token count ``L`` after padding/truncation.
            dtype: Dtype of the embeddings (default: the model's).
            device: Device of the outputs (default: the model's).

        Returns:
            ``prompt_embeds`` of shape ``(B, L, len(layers) * hidden)`` and ``text_ids`` (int64) of shape
            ``(B, L, 4)``.
        """
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        if not batch:
            raise PipelineInputError("At least one prompt is needed (an empty string is a valid prompt).")
        if max_sequence_length < 1:
            raise PipelineInputError(f"max_sequence_length must be positive, got {max_sequence_length}.")
        input_ids, attention_mask = self.tokenize(batch, max_sequence_length)
        model_device = self.execution_device or _model_device(self.model)
        out = self.model(
            input_ids=input_ids.to(model_device),
            attention_mask=attention_mask.to(model_device),
            output_hidden_states=True,
            use_cache=False,
        )
        states = torch.stack([out.hidden_states[k] for k in self.layers], dim=1)  # (B, C, L, D)
        states = states.to(dtype=dtype or _model_dtype(self.model), device=device or model_device)
        b, c, length, d = states.shape
        embeds = states.permute(0, 2, 1, 3).reshape(b, length, c * d)
        return embeds, prompt_text_ids(b, length, device=embeds.device)

    __call__ = encode


class Qwen3PromptEncoder(PromptEncoder):
    """FLUX.2-klein prompts: Qwen3 chat template (thinking off), hidden states ``(9, 18, 27)``."""

    kind = "qwen3"
    default_layers = QWEN3_LAYERS

    def tokenize(self, prompts: list[str], max_sequence_length: int) -> tuple[Tensor, Tensor]:
        """Render each prompt as one user turn plus the assistant header and an empty think block."""
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=False,
            )
            for prompt in prompts
        ]
        enc = self.tokenizer(
            texts, return_tensors="pt", padding="max_length", truncation=True, max_length=max_sequence_length
        )
        return enc["input_ids"], enc["attention_mask"]

    @classmethod
    def from_pretrained(
        cls,
        text_encoder: Any,
        tokenizer: Any,
        torch_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Qwen3PromptEncoder:
        """Load weights (folder/files, see :func:`load_qwen3_encoder`) and a tokenizer folder (or object)."""
        tok = tokenizer if hasattr(tokenizer, "apply_chat_template") else load_tokenizer(tokenizer, "qwen3")
        return cls(load_qwen3_encoder(text_encoder, torch_dtype, device), tok)


class Mistral3PromptEncoder(PromptEncoder):
    """FLUX.2-dev prompts: system + user turns for Mistral-Small, hidden states ``(10, 20, 30)``."""

    kind = "mistral3"
    default_layers = MISTRAL3_LAYERS

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        layers: Sequence[int] | None = None,
        system_message: str = MISTRAL3_SYSTEM_MESSAGE,
    ) -> None:
        super().__init__(model, tokenizer, layers)
        self.system_message = system_message

    def messages(self, prompts: list[str]) -> list[list[dict[str, Any]]]:
        """One conversation per prompt: the system turn, then the prompt with ``[IMG]`` removed."""
        system = {"role": "system", "content": [{"type": "text", "text": self.system_message}]}
        return [
            [system, {"role": "user", "content": [{"type": "text", "text": p.replace("[IMG]", "")}]}] for p in prompts
        ]

    def tokenize(self, prompts: list[str], max_sequence_length: int) -> tuple[Tensor, Tensor]:
        """Apply the chat template to the whole batch, tokenized to ``max_sequence_length``."""
        enc = self.tokenizer.apply_chat_template(
            self.messages(prompts),
            add_generation_prompt=False,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=max_sequence_length,
        )
        return enc["input_ids"], enc["attention_mask"]

    @classmethod
    def from_pretrained(
        cls,
        text_encoder: Any,
        tokenizer: Any,
        torch_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Mistral3PromptEncoder:
        """Load weights (see :func:`load_mistral3_encoder`) and a tokenizer folder (or object)."""
        tok = tokenizer if hasattr(tokenizer, "apply_chat_template") else load_tokenizer(tokenizer, "mistral3")
        return cls(load_mistral3_encoder(text_encoder, torch_dtype, device), tok)
