"""FLUX.2 prompt encoding: a prompt through the chat template, the tokenizer and the decoder, to DiT context.

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

Tokenizers load offline from a folder with ``AutoTokenizer``. The official dev ``tokenizer/`` folder describes
a ``PixtralProcessor``; for text it only forwards to its tokenizer, so the tokenizer half is loaded (no
torchvision needed). Any object with ``apply_chat_template`` (a processor included) may be passed instead.
The models themselves are recognised and built by :mod:`diffstudio_flux2.text_encoder_weights`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffstudio.errors import PipelineInputError
from torch import Tensor, nn

from diffstudio_flux2.math import text_ids as _text_ids
from diffstudio_flux2.text_encoder_weights import (
    DEFAULT_MAX_SEQUENCE_LENGTH,
    MISTRAL3_LAYERS,
    MISTRAL3_SYSTEM_MESSAGE,
    QWEN3_LAYERS,
    load_mistral3_encoder,
    load_qwen3_encoder,
)
from diffstudio_flux2.tokenizers import TokenizerConfigError, load_tokenizer

__all__ = ["Mistral3PromptEncoder", "PromptEncoder", "Qwen3PromptEncoder", "prompt_text_ids"]


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
