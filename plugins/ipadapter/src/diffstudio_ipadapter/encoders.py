"""Image encoding for the IP-Adapters: preprocessing through transformers' image processors, then the encoder.

* SigLIP (InstantX): ``SiglipImageProcessor`` at the model's ``image_size`` (resize, rescale, normalise with
  mean = std = 0.5), then ``SiglipVisionModel(...).pooler_output`` ``(N, 1152)``.
* CLIP (XLabs): ``CLIPImageProcessor(size=image_size, crop_size=image_size)`` (what diffusers builds for
  ``load_ip_adapter``), then ``CLIPVisionModelWithProjection(...).image_embeds`` ``(N, 768)``.
"""

from __future__ import annotations

from typing import Any

import torch
from diffstudio.errors import PipelineInputError
from PIL import Image
from torch import Tensor


def as_images(value: Any, argument: str) -> list[Image.Image]:
    """One PIL image or a list of them; anything else is a ``PipelineInputError`` naming ``argument``."""
    images = list(value) if isinstance(value, (list, tuple)) else [value]
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise PipelineInputError(f"{argument}[{i}] must be a PIL image, got {type(image).__name__}")
    if not images:
        raise PipelineInputError(f"{argument} is empty")
    return [img.convert("RGB") for img in images]


def encode_images(encoder: Any, value: Any, argument: str) -> Tensor:
    """Embeddings ``(N, E)`` of the images (float32, on the encoder's device)."""
    from diffstudio.startup import imports_without_gc

    with imports_without_gc():  # the image processors' modules
        from transformers import CLIPImageProcessor, SiglipImageProcessor, SiglipVisionModel

    images = as_images(value, argument)
    size = int(encoder.config.image_size)
    param = next(encoder.parameters())
    if isinstance(encoder, SiglipVisionModel):
        processor: Any = SiglipImageProcessor(size={"height": size, "width": size})
    else:
        processor = CLIPImageProcessor(size=size, crop_size=size)
    pixels = processor(images=images, return_tensors="pt").pixel_values.to(param.device, param.dtype)
    with torch.no_grad():
        out = encoder(pixel_values=pixels)
    embeds: Tensor = out.pooler_output if isinstance(encoder, SiglipVisionModel) else out.image_embeds
    return embeds.float()
