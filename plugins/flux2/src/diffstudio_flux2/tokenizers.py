"""Loading FLUX.2 tokenizers offline (Qwen2 tokenizer for klein, Mistral tokenizer for dev).

The official ``tokenizer/`` folders load with ``AutoTokenizer`` and ``local_files_only=True``. The dev folder
describes a ``PixtralProcessor`` (which transformers builds only with torchvision installed); prompt encoding
needs just its text tokenizer, which lies in the same folder and carries the same chat template
(``chat_template.jinja``; the older processor-style ``chat_template.json`` is read as a fallback).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from diffstudio.errors import PipelineInputError

__all__ = ["TokenizerConfigError", "load_tokenizer"]


class TokenizerConfigError(PipelineInputError):
    """The tokenizer folder is missing or does not hold a usable tokenizer with a chat template."""


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "tekken.json")


def load_tokenizer(source: str | os.PathLike[str] | None, kind: str = "qwen3") -> Any:
    """Load a tokenizer folder offline and make sure it has a chat template.

    Args:
        source: The ``tokenizer/`` folder (or a file inside it).
        kind: ``"qwen3"`` (klein) or ``"mistral3"`` (dev); used in messages only.

    Returns:
        A transformers tokenizer (``Qwen2TokenizerFast`` for klein, the text tokenizer of the Pixtral
        processor folder for dev).

    Raises:
        TokenizerConfigError: no folder, no tokenizer files in it, a folder transformers cannot read, or no
            chat template (``chat_template.jinja``, ``chat_template.json`` or ``tokenizer_config.json``).
    """
    hint = (
        f"Pass tokenizer_config=ModelConfig(model_id=..., origin_file_pattern='tokenizer/') (or path=...) "
        f"pointing at the {kind} tokenizer folder of the model repository."
    )
    if source is None:
        raise TokenizerConfigError(f"No tokenizer was given for the {kind} text encoder. {hint}")
    folder = Path(source)
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise TokenizerConfigError(f"The tokenizer folder {str(folder)!r} does not exist. {hint}")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise TokenizerConfigError(
            f"The folder {str(folder)!r} holds no tokenizer files (expected one of "
            f"{', '.join(_TOKENIZER_FILES)}). {hint}"
        )
    from diffstudio.startup import imports_without_gc

    try:
        with imports_without_gc():  # transformers, and the tokenizer class's module
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many types (OSError, ValueError, JSONDecodeError ...)
        raise TokenizerConfigError(f"The tokenizer in {str(folder)!r} could not be loaded: {exc}. {hint}") from exc
    if not getattr(tokenizer, "chat_template", None):
        template_json = folder / "chat_template.json"  # processor-style template of older saves
        if template_json.is_file():
            try:
                tokenizer.chat_template = json.loads(template_json.read_text(encoding="utf-8"))["chat_template"]
            except (ValueError, KeyError, TypeError) as exc:
                raise TokenizerConfigError(f"{template_json} is not a valid chat template file. {hint}") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise TokenizerConfigError(
            f"The tokenizer in {str(folder)!r} has no chat template, which FLUX.2 prompt encoding needs. {hint}"
        )
    return tokenizer
