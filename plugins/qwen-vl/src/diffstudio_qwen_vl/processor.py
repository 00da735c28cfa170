"""The Qwen2.5-VL processor: chat template, tokenizer and image processor, with pixel bounds set per caller.

:func:`load_processor` reads a processor folder offline (the official ``Qwen/Qwen2.5-VL-7B-Instruct`` root, or
Nexus-Gen's ``processor/``): ``AutoProcessor.from_pretrained(folder, min_pixels=, max_pixels=)``. In
transformers 5 that class also builds a video processor, which needs torchvision; where torchvision is absent
(these machines) the same folder is read as :class:`ImageTextProcessor`: transformers' own tokenizer
(``AutoTokenizer``) and image processor (``AutoImageProcessor``, the PIL backend) and the folder's chat template,
with the image-token expansion of ``Qwen2_5_VLProcessor.__call__`` (each ``<|image_pad|>`` becomes
``t * h * w / merge_size**2`` copies, one per merged patch). Both objects are called the same way::

    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, add_vision_id=True)
    batch = processor(text=[text], images=[image], padding=True, return_tensors="pt")
    # input_ids, attention_mask, mm_token_type_ids (B, L), pixel_values (sum of t*h*w, C*T*P*P), image_grid_thw (N, 3)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffstudio.errors import PipelineInputError

__all__ = ["ImageTextProcessor", "ProcessorConfigError", "load_processor"]

_log = logging.getLogger(__name__)


class ProcessorConfigError(PipelineInputError):
    """A Qwen2.5-VL processor folder is missing or cannot be read."""


class ImageTextProcessor:
    """Qwen2.5-VL's processor for text and images (no video), over transformers' tokenizer and image processor.

    Args:
        tokenizer: The folder's tokenizer (``Qwen2Tokenizer``), with the chat template.
        image_processor: The folder's ``Qwen2VLImageProcessor`` (PIL or fast backend).
        chat_template: Jinja chat template (None: the tokenizer's).
    """

    image_token = "<|image_pad|>"

    def __init__(self, tokenizer: Any, image_processor: Any, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> Any:
        """Render ``messages`` with the chat template (extra keyword arguments such as ``add_vision_id`` reach it)."""
        return self.tokenizer.apply_chat_template(list(messages), chat_template=self.chat_template, **kwargs)

    def __call__(self, text: str | Sequence[str], images: Sequence[Any] | None = None, **kwargs: Any) -> Any:
        """Tokenize ``text`` (one string or a batch) with the images' placeholder tokens expanded.

        Args:
            text: Rendered chat text(s), each ``<|image_pad|>`` standing for the next image.
            images: PIL images in the order of their placeholders over the whole batch.
            **kwargs: Tokenizer options (``padding``, ``return_tensors``, ...).

        Returns:
            A ``BatchFeature``: ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` (1 at image tokens:
            transformers 5 computes the 3-D multimodal RoPE positions only when it is given) and, with images,
            ``pixel_values`` and ``image_grid_thw``.

        Raises:
            ProcessorConfigError: The texts hold another number of image placeholders than there are images.
        """
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text)
        image_inputs: dict[str, Any] = {}
        if images:
            image_inputs = dict(self.image_processor(images=list(images), return_tensors=kwargs.get("return_tensors")))
            merge = int(self.image_processor.merge_size) ** 2
            counts = [int(g.prod()) // merge for g in image_inputs["image_grid_thw"]]
            marker, index, expanded = "<|placeholder|>", 0, []
            for each in texts:
                while self.image_token in each:
                    if index >= len(counts):
                        raise ProcessorConfigError(f"the texts hold more {self.image_token} than {len(counts)} images")
                    each = each.replace(self.image_token, marker * counts[index], 1)
                    index += 1
                expanded.append(each.replace(marker, self.image_token))
            if index != len(counts):
                raise ProcessorConfigError(f"{len(counts)} images for {index} {self.image_token} placeholders")
            texts = expanded
        encoded = dict(self.tokenizer(texts, **kwargs))
        encoded["mm_token_type_ids"] = [
            [1 if int(i) == self.image_token_id else 0 for i in row] for row in encoded["input_ids"]
        ]
        return BatchFeature(data={**encoded, **image_inputs}, tensor_type=kwargs.get("return_tensors"))


def load_processor(
    source: str | os.PathLike[str],
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> Any:
    """Load the Qwen2.5-VL processor of a folder offline, with the caller's pixel bounds.

    Args:
        source: The folder holding ``preprocessor_config.json``, the tokenizer files and the chat template (or a
            file inside it).
        min_pixels: Lower bound of an image's area after resizing (Step1X: ``256 * 28 * 28``); None keeps the
            folder's.
        max_pixels: Upper bound (Step1X: ``324 * 28 * 28``; Nexus-Gen bounds its reference to 262,640 itself).

    Returns:
        ``AutoProcessor``'s ``Qwen2_5_VLProcessor`` where it can be built, else :class:`ImageTextProcessor` over the
        same files (see the module docstring); both have ``apply_chat_template``, ``__call__``, ``tokenizer`` and
        ``image_processor``.

    Raises:
        ProcessorConfigError: No folder, or transformers cannot read it.
    """
    from diffstudio.startup import imports_without_gc

    path = Path(source)
    folder = path if path.is_dir() else path.parent
    if not (folder / "preprocessor_config.json").is_file():
        raise ProcessorConfigError(
            f"{folder} holds no Qwen2.5-VL processor (no preprocessor_config.json); pass the model folder of "
            f"Qwen/Qwen2.5-VL-7B-Instruct (or Nexus-Gen's processor/) as the processor's ModelConfig."
        )
    bounds = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    with imports_without_gc():
        from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    try:
        return AutoProcessor.from_pretrained(str(folder), local_files_only=True, **bounds)
    except ImportError as exc:  # the video half needs torchvision; text + images do not
        _log.debug("AutoProcessor unavailable for %s (%s); reading tokenizer + image processor", folder, exc)
    except (OSError, ValueError) as exc:
        raise ProcessorConfigError(f"{folder} cannot be read as a Qwen2.5-VL processor: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        image_processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True, **bounds)
    except (OSError, ValueError) as exc:
        raise ProcessorConfigError(f"{folder} cannot be read as a Qwen2.5-VL processor: {exc}") from exc
    template_file = folder / "chat_template.jinja"
    template = template_file.read_text(encoding="utf-8") if template_file.is_file() else None
    if template is None and (folder / "chat_template.json").is_file():
        from diffstudio._io import read_json

        template = read_json(folder / "chat_template.json").get("chat_template")
    return ImageTextProcessor(tokenizer, image_processor, template)
