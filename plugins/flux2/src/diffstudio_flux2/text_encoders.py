"""FLUX.2 text encoders: Qwen3 (klein) and Mistral3 (dev) through transformers (both halves, re-exported).

The weights (recognising and building the decoders) are :mod:`diffstudio_flux2.text_encoder_weights`, the prompt
encoders (chat template, tokens, stacked hidden states) :mod:`diffstudio_flux2.prompt_encoders`; every name
stays importable from here.

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

from diffstudio_flux2.prompt_encoders import Mistral3PromptEncoder, PromptEncoder, Qwen3PromptEncoder, prompt_text_ids
from diffstudio_flux2.text_encoder_weights import (
    DEFAULT_MAX_SEQUENCE_LENGTH,
    MISTRAL3_LAYERS,
    MISTRAL3_SYSTEM_MESSAGE,
    QWEN3_LAYERS,
    TextEncoderError,
    TextEncoderMismatchError,
    check_context_width,
    is_mistral3_text_encoder,
    is_qwen3_text_encoder,
    load_mistral3_encoder,
    load_qwen3_encoder,
    mistral3_layout,
    text_hidden_size,
)
from diffstudio_flux2.tokenizers import TokenizerConfigError, load_tokenizer

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
