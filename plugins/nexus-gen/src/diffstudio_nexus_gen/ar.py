"""Nexus-Gen's autoregressive model: Qwen2.5-VL + ``vision_head`` + ``image_prefill_embeds``, one prefilled forward.

Nexus-Gen predicts an image's 81 embeddings in **one** forward of its Qwen2.5-VL (no sampling loop):

1. The chat template renders the published messages (generation: user "Generate an image according to the
   following description: {prompt}", assistant "Here is an image based on the description: <image>"; editing:
   user "<image> {instruction}", assistant "Here is the image: <image>"), each ``<image>`` written as
   ``<|vision_start|><|image_pad|><|vision_end|>``.
2. The images are the reference (editing only), bounded to 262,640 pixels with Qwen's ``smart_resize`` (sides
   multiples of 28), and a 252 x 252 white placeholder: a 1 x 18 x 18 patch grid, 81 merged tokens.
3. Token embeddings; the reference's ``<|image_pad|>`` tokens get its visual embeddings, the placeholder's 81
   tokens get ``image_prefill_embeds(0..80)`` (never the placeholder's own pixels).
4. Positions from the model's ``get_rope_index`` (3-D multimodal RoPE over the two grids), one causal forward of
   the language model, ``vision_head`` on the last hidden states; the prediction for target token ``k`` is read
   at the position before it (hidden states shifted by one).

This is written for transformers 5's ``Qwen2_5_VLModel`` (``model.language_model`` + ``model.visual``); the
published code subclasses 4.49 internals that no longer exist. Only one prompt per forward (as published):
:meth:`NexusGenAR.encode` loops over a batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from diffstudio.errors import PipelineInputError
from PIL import Image
from torch import Tensor, nn

MAX_PIXELS = 262_640
"""The reference image's area bound (Nexus-Gen's ``max_pixels``)."""
PLACEHOLDER_SIDE = 252
"""The target placeholder's side in pixels: 18 x 18 patches of 14, 9 x 9 = 81 merged tokens."""
TARGET_TOKENS = 81
VISION = "<|vision_start|><|image_pad|><|vision_end|>"


def generation_messages(prompt: str) -> list[dict[str, str]]:
    """The published chat messages for text-to-image."""
    return [
        {"role": "user", "content": f"Generate an image according to the following description: {prompt}"},
        {"role": "assistant", "content": "Here is an image based on the description: <image>"},
    ]


def editing_messages(instruction: str) -> list[dict[str, str]]:
    """The published chat messages for editing (``<image>`` put first when the instruction has none)."""
    if "<image>" not in instruction:
        instruction = "<image> " + instruction
    return [{"role": "user", "content": instruction}, {"role": "assistant", "content": "Here is the image: <image>"}]


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = MAX_PIXELS
) -> tuple[int, int]:
    """Qwen2-VL's target size: sides rounded to multiples of ``factor``, area scaled into ``[min, max]_pixels``.

    Raises:
        PipelineInputError: An aspect ratio over 200 (the vision tower's limit).
    """
    if max(height, width) / min(height, width) > 200:
        raise PipelineInputError(f"nexus_gen_reference_image is {width}x{height}: the aspect ratio must stay under 200")
    h_bar, w_bar = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def bound_image(image: Image.Image, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Resize to Qwen's ``smart_resize`` size: sides multiples of 28, area within ``[3136, max_pixels]``."""
    height, width = smart_resize(image.height, image.width, max_pixels=max_pixels)
    return image.resize((width, height))


def placeholder() -> Image.Image:
    """The white 252 x 252 target placeholder."""
    return Image.new("RGB", (PLACEHOLDER_SIDE, PLACEHOLDER_SIDE), (255, 255, 255))


@dataclass(frozen=True)
class PrefillOutput:
    """What one prefilled forward returns.

    Attributes:
        target: The 81 predicted target embeddings ``(81, C_vl)``.
        reference: The reference image's visual embeddings ``(N_ref, C_vl)`` (editing), else None.
        grids: The images' vision grids ``(n_images, 3)`` (``(t, h, w)`` in patches; the target's is last).
    """

    target: Tensor
    reference: Tensor | None
    grids: Tensor


class NexusGenAR(nn.Module):
    """Qwen2.5-VL (transformers 5 ``Qwen2_5_VLModel``) with Nexus-Gen's two extra tensors.

    State-dict names: ``model.*`` (the VLM, ``Qwen2_5_VLModel`` names), ``vision_head.weight``,
    ``image_prefill_embeds.weight``.

    Args:
        model: The VLM.
        prefill_tokens: Rows of ``image_prefill_embeds`` (81).
    """

    def __init__(self, model: nn.Module, prefill_tokens: int = TARGET_TOKENS) -> None:
        super().__init__()
        hidden = int(model.config.text_config.hidden_size)
        self.model = model
        self.vision_head = nn.Linear(hidden, hidden, bias=False)
        self.image_prefill_embeds = nn.Embedding(prefill_tokens, hidden)
        self.processor: Any = None
        self.max_pixels = MAX_PIXELS

    @property
    def image_token_id(self) -> int:
        """The ``<|image_pad|>`` token id."""
        return int(self.model.config.image_token_id)

    def inputs(self, prompt: str, reference: Image.Image | None) -> Any:
        """Tokenize the published messages and the images: ``input_ids (1, L)``, ``pixel_values``, ``image_grid_thw``.

        Raises:
            RuntimeError: No processor is attached (the loader attaches the one beside the weights).
        """
        if self.processor is None:
            raise RuntimeError("NexusGenAR has no processor; set .processor (diffstudio_qwen_vl.load_processor)")
        messages = editing_messages(prompt) if reference is not None else generation_messages(prompt)
        images = [bound_image(reference.convert("RGB"), self.max_pixels)] if reference is not None else []
        images.append(placeholder())
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        text = text.replace("<image>", VISION)
        return self.processor(text=[text], images=images, padding=True, return_tensors="pt")

    def prefill(
        self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, image_grid_thw: Tensor
    ) -> PrefillOutput:
        """The prefilled forward on tokenized inputs (batch 1; the last image is the target placeholder).

        Args:
            input_ids: ``(1, L)`` token ids with each image's ``<|image_pad|>`` tokens expanded.
            attention_mask: ``(1, L)``.
            pixel_values: The images' patches ``(sum t*h*w, C*T*P*P)``.
            image_grid_thw: ``(n_images, 3)``.
        """
        device = self.vision_head.weight.device
        ids, mask = input_ids.to(device), attention_mask.to(device)
        grids = image_grid_thw.to(device)
        embeds = self.model.get_input_embeddings()(ids)
        features = self.model.get_image_features(pixel_values.to(device), grids, return_dict=True).pooler_output
        image_mask = ids == self.image_token_id
        n_target = self.image_prefill_embeds.num_embeddings
        order = image_mask.cumsum(dim=1)
        target_mask = image_mask & (order > int(image_mask.sum()) - n_target)
        reference = torch.cat(list(features[:-1])).to(embeds) if len(features) > 1 else None
        if reference is not None:
            embeds = embeds.masked_scatter((image_mask & ~target_mask)[..., None].expand_as(embeds), reference)
        prefill = self.image_prefill_embeds.weight.to(embeds)
        embeds = embeds.masked_scatter(target_mask[..., None].expand_as(embeds), prefill)
        token_types = image_mask.to(torch.int32)
        positions, _ = self.model.get_rope_index(ids, token_types, image_grid_thw=grids, attention_mask=mask)
        hidden = self.model.language_model(
            inputs_embeds=embeds, position_ids=positions, attention_mask=mask, use_cache=False
        ).last_hidden_state
        predicted = self.vision_head(hidden)[:, :-1][target_mask[:, 1:]]
        return PrefillOutput(predicted, reference, image_grid_thw)

    def forward(self, prompt: str, reference: Image.Image | None = None) -> PrefillOutput:
        """One prompt (and reference image for editing) -> :class:`PrefillOutput`."""
        batch = self.inputs(prompt, reference)
        return self.prefill(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"])
