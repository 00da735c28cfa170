"""Step1X-Edit prompt embedding, as published: Qwen2.5-VL over (fixed prefix, reference image, instruction).

For each prompt (and the negative prompt, each with the same reference image):

1. the chat message ``[{"role": "user", "content": [text PREFIX, image, text instruction]}]`` is rendered with
   ``add_generation_prompt=True, add_vision_id=True`` and processed with the image (pixels bounded to
   ``256 * 28 * 28 .. 324 * 28 * 28``);
2. the text after ``<|vision_end|>`` is re-tokenized piece by piece: curly quotes become ``"``, and past character
   155 each character inside double quotes is tokenized alone as ``“c”`` with the curly-quote tokens dropped, so
   quoted text (signs, captions) reaches the model one character per token;
3. the attention mask is ``input_ids > 0`` (as published: token 0 is also masked);
4. the last hidden state is read, its first ``drop`` tokens (217: the fixed prefix) dropped, and at most
   ``max_length`` (640) kept, zero-padded, with a 0/1 mask ``(B, 640)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["DROP_TOKENS", "MAX_LENGTH", "MAX_PIXELS", "MIN_PIXELS", "PREFIX", "Step1XPromptEncoder", "split_string"]

DROP_TOKENS = 217
MAX_LENGTH = 640
MIN_PIXELS, MAX_PIXELS = 256 * 28 * 28, 324 * 28 * 28
QUOTE_AFTER = 155

PREFIX = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for '
    "image generation. Evaluate the level of detail in the user prompt:\n"
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.\n"
    "- If the prompt is already detailed, refine and enhance the existing details slightly without "
    "overcomplicating.\n\n"
    "Here are examples of how to transform or refine prompts:\n"
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up tightly on a sunny windowsill, "
    "bathed in soft afternoon light, with a green potted plant nearby.\n"
    "- User Prompt: A busy city street -> Enhanced: A bustling city street at dusk, filled with glowing neon signs, "
    "people walking in all directions, and yellow taxis honking impatiently.\n\n"
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:\n"
    "User Prompt:"
)
"""The fixed instruction prefix of Step1X-Edit's embedder (a model input: it must match the published one)."""


def split_string(text: str) -> list[str]:
    """Pieces to tokenize one by one: quoted characters past :data:`QUOTE_AFTER` alone, wrapped in curly quotes."""
    text = text.replace("\u201c", '"').replace("\u201d", '"').replace("'", '"')
    pieces, in_quotes, current = [], False, ""
    for index, char in enumerate(text):
        if char == '"' and index > QUOTE_AFTER:
            current += char
            if not in_quotes:
                pieces.append(current)
                current = ""
            in_quotes = not in_quotes
            continue
        if in_quotes:
            pieces.append("\u201c" + char + "\u201d")
        else:
            current += char
    if current:
        pieces.append(current)
    return pieces


@dataclass
class Step1XPromptEncoder:
    """Prompt embeddings for Step1X-Edit (see the module docstring).

    Attributes:
        model: The ``Qwen2_5_VLModel`` (the ``qwen_vl`` slot).
        processor: Its processor (``diffstudio_qwen_vl.load_processor`` with Step1X's pixel bounds).
        drop: Leading tokens dropped (217 for Qwen2.5-VL-7B-Instruct's template and tokenizer).
        max_length: Tokens kept (640).
    """

    model: Any
    processor: Any
    drop: int = DROP_TOKENS
    max_length: int = MAX_LENGTH

    def token_ids(self, instruction: str, image: Any) -> tuple[Tensor, Any]:
        """``input_ids (1, L)`` with the quoted text split, and the processor batch (pixels, grid)."""
        messages = [{"role": "user", "content": [
            {"type": "text", "text": PREFIX}, {"type": "image"}, {"type": "text", "text": instruction},
        ]}]  # fmt: skip
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  add_vision_id=True)  # fmt: skip
        batch = self.processor(text=[text], images=[image], padding=True, return_tensors="pt")
        tokenizer = self.processor.tokenizer
        vision_end = tokenizer.convert_tokens_to_ids("<|vision_end|>")
        open_q, close_q = (tokenizer(q, add_special_tokens=False)["input_ids"] for q in ("\u201c", "\u201d"))
        pieces = []
        for piece in split_string(text):
            ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
            if (
                len(open_q) == 1
                and len(close_q) == 1
                and len(ids) > 2
                and ids[0] == open_q[0]
                and ids[-1] == close_q[0]
            ):
                ids = ids[1:-1]
            pieces.extend(ids)
        old = batch["input_ids"][0]
        new = torch.tensor(pieces, dtype=old.dtype)
        cut_old = int((old == vision_end).nonzero()[0, 0])
        cut_new = int((new == vision_end).nonzero()[0, 0])
        return torch.cat([old[:cut_old], new[cut_new:]]).unsqueeze(0), batch

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], images: Sequence[Any]) -> tuple[Tensor, Tensor]:
        """``(B, max_length, C_llm)`` embeddings (float32) and ``(B, max_length)`` 0/1 masks (int64)."""
        from diffstudio_qwen_vl import last_hidden_state

        width = int(self.model.config.text_config.hidden_size)
        embs = torch.zeros(len(prompts), self.max_length, width)
        masks = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for index, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
            ids, batch = self.token_ids(prompt, image)
            inputs = {"input_ids": ids, "attention_mask": (ids > 0).long(), "pixel_values": batch["pixel_values"],
                      "image_grid_thw": batch["image_grid_thw"]}  # fmt: skip
            hidden = last_hidden_state(self.model, inputs)[0, self.drop :][: self.max_length]
            embs[index, : hidden.shape[0]] = hidden.float().cpu()
            masks[index, : hidden.shape[0]] = 1
        return embs, masks
