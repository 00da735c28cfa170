"""Conversions between PIL images and ``[-1, 1]`` tensors, and the ``output_type`` contract."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from diffstudio.errors import PipelineInputError
from diffstudio.pipeline.validate import ensure_finite


def to_rgb(image: Any, *, argument: str = "image") -> Image.Image:
    """Return ``image`` converted to RGB; a PIL image whose pixels cannot be read or converted is a typed error.

    Raises:
        PipelineInputError: ``image`` is not a PIL image, its mode has no RGB conversion (e.g. ``"La"``), or its
            file is truncated or corrupt (the message names ``argument``).
    """
    if not isinstance(image, Image.Image):
        raise PipelineInputError(
            f"{argument} must be a PIL.Image.Image, got {type(image).__name__}; open files with PIL.Image.open(path)"
        )
    if image.mode == "RGB":
        try:
            image.load()
        except (OSError, ValueError, SyntaxError) as exc:
            raise PipelineInputError(f"{argument}: cannot read the image's pixels ({exc}); check the file") from None
        return image
    try:
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise PipelineInputError(
            f"{argument}: cannot convert the {image.mode!r} image to RGB ({exc}); convert it yourself first, "
            f"e.g. image.convert('RGBA').convert('RGB')"
        ) from None


def as_image_list(value: Any, argument: str) -> list[Image.Image]:
    """Accept one PIL image or a non-empty list/tuple of them; anything else is a typed error naming ``argument``.

    Raises:
        PipelineInputError: An empty list (pass None for no image), or an entry that is not a PIL image.
    """
    images = list(value) if isinstance(value, (list, tuple)) else [value]
    if not images:
        raise PipelineInputError(f"{argument}=[] holds no image; pass an image, a list of images, or None for none")
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            where = f"{argument}[{i}]" if isinstance(value, (list, tuple)) else argument
            raise PipelineInputError(
                f"{where} must be a PIL.Image.Image, got {type(image).__name__}; open files with "
                f"PIL.Image.open(path).convert('RGB')"
            )
    return images


def pil_to_tensor(image: Any, *, argument: str = "image") -> torch.Tensor:
    """Convert a PIL image to ``(1, 3, H, W)`` float32 in ``[-1, 1]``.

    Raises:
        PipelineInputError: ``image`` is not a PIL image (the message names ``argument``).
    """
    array = np.asarray(to_rgb(image, argument=argument), dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Convert ``(B, 3, H, W)`` in ``[-1, 1]`` to a list of RGB PIL images."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    return [Image.fromarray(a) for a in array]


def convert_output(images: torch.Tensor, output_type: str, single: bool) -> Any:
    """Turn decoded images into the requested ``output_type``.

    Args:
        images: ``(B, 3, H, W)`` in ``[-1, 1]``.
        output_type: ``"pil"`` (list of PIL images), ``"np"`` (``(B, H, W, 3)`` float32 in ``[0, 1]``) or
            ``"pt"`` (``(B, 3, H, W)`` float32 in ``[0, 1]``).
        single: The caller passed one prompt: return one image instead of a list (``"pil"`` only).

    Raises:
        NonFiniteOutputError: The decoded images hold NaN or Inf (checked before any conversion).
    """
    ensure_finite(images, "in the decoded images")
    if output_type == "pil":
        pil = tensor_to_pil(images)
        return pil[0] if single else pil
    unit = ((images.float() + 1) / 2).clamp(0, 1)
    if output_type == "pt":
        return unit.cpu()
    if output_type == "np":
        return unit.permute(0, 2, 3, 1).cpu().numpy()
    raise PipelineInputError(f"output_type={output_type!r} is not an image type")
