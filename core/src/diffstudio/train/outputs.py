"""What the trainer writes: LoRAs in a published layout, full fine-tunes in the base model's own format."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from diffstudio.errors import ConfigError
from diffstudio.lora import CanonicalLora, LoraWeights
from diffstudio.train.checkpoints import save_weights

_LAYOUT_NAMES = {"diffusers": ("diffusers",), "comfy": ("comfy", "bfl"), "kohya": ("kohya",)}


def lora_writer(runtime: Any, family: str, layout: str) -> Any:
    """The family's registered ``LoraFormat`` that writes ``layout`` (diffusers, comfy or kohya)."""
    formats = {fmt.name: fmt for fmt in runtime.hooks.lora_formats()}
    for suffix in _LAYOUT_NAMES.get(layout, (layout,)):
        fmt = formats.get(f"{family}/{suffix}")
        if fmt is not None and fmt.from_canonical is not None:
            return fmt
    writable = sorted(name for name, fmt in formats.items() if fmt.family == family and fmt.from_canonical)
    raise ConfigError(
        f"--lora_format {layout}: the {family!r} family registers no writer for it; writable layouts: "
        f"{', '.join(writable) or 'none'}"
    )


def lora_reader(runtime: Any, family: str, tensors: Mapping[str, Tensor], where: str) -> CanonicalLora:
    """Parse a LoRA state dict with the family's registered formats (exactly one must recognise it)."""
    keys = list(tensors)
    found = [fmt for fmt in runtime.hooks.lora_formats() if fmt.family == family and fmt.detect(keys)]
    if not found:
        raise ConfigError(f"{where}: no {family} LoRA layout recognises keys like {keys[:3]}")
    parsed = found[0].to_canonical(tensors)
    canonical = getattr(parsed, "lora", parsed)
    if not isinstance(canonical, dict):
        raise ConfigError(f"{where}: the {found[0].name} reader returned {type(parsed).__name__}")
    return {k: v for k, v in canonical.items() if isinstance(v, LoraWeights)}


def save_lora(
    runtime: Any,
    family: str,
    lora: CanonicalLora,
    path: Path,
    layout: str,
    *,
    rank: int,
    alpha: float | None,
    base_model: str,
    remove_prefix: str | None = None,
) -> Path:
    """Write a trained LoRA in ``layout`` with its training facts in the file's metadata.

    ``remove_prefix`` (``--remove_prefix_in_ckpt``) is dropped from the written keys that start with it.
    """
    tensors, metadata = lora_writer(runtime, family, layout).from_canonical(lora)
    tensors = strip_prefix(tensors, remove_prefix)
    metadata = dict(metadata)
    metadata.setdefault("diffstudio.lora", json.dumps({"rank": rank, "alpha": alpha, "base_model": base_model}))
    return save_weights(path, tensors, metadata)


def full_state(module: nn.Module, runtime: Any, claim: Any) -> tuple[dict[str, Tensor], str]:
    """The component's weights in the format its checkpoint came in; returns (tensors, format name).

    Family modules use their canonical (BFL-style) names; when the checkpoint was in another layout, the
    family's registered converter back to that layout is applied.
    """
    state = {k: v for k, v in module.state_dict().items()}
    fmt = getattr(claim, "source_format", "") or ""
    if not fmt or fmt in ("bfl", "transformers", "native", "comfy"):
        return state, fmt or "native"
    wanted = f"{claim.family}_{claim.component}"
    for converter in runtime.hooks.converters():
        if converter.source == "bfl" and converter.target == fmt and wanted in converter.name:
            return dict(converter(state)), fmt
    return state, "bfl"


def strip_prefix(tensors: Mapping[str, Tensor], prefix: str | None) -> dict[str, Tensor]:
    """Drop ``prefix`` from the keys that start with it (``--remove_prefix_in_ckpt``)."""
    if not prefix:
        return dict(tensors)
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in tensors.items()}
