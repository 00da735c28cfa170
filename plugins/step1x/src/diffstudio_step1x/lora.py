"""Step1X-Edit LoRA files: the BFL / ComfyUI layout over the whole Step1X DiT, connector included.

Keys are ``diffusion_model.<module path>.lora_down.weight`` ``(r, in)``, ``.lora_up.weight`` ``(out, r)`` and
``.alpha`` (a scalar), where the module path is the :class:`~diffstudio_step1x.model.Step1XDiT` name of a
``DeltaLinear``: FLUX.1's BFL names (``double_blocks.0.img_attn.qkv``) and the connector's
(``connector.S.individual_token_refiner.blocks.0.self_attn_qkv``). For DiT layers this is exactly FLUX.1's
``flux1/bfl`` layout, so a Step1X LoRA without connector layers also loads in a FLUX.1 pipeline.

The trainer writes it for ``--lora_base_model dit --lora_format comfy`` (the family registers no diffusers or
kohya writer: neither library names the connector); :meth:`Step1XEditPipeline.load_lora` reads it back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffstudio.lora import LoraFormatError, LoraWeights, alpha_value
from diffstudio.types import LoraFormat
from torch import Tensor

__all__ = ["CONNECTOR_PREFIX", "FORMAT", "PREFIX", "layouts", "parse", "write"]

PREFIX = "diffusion_model."
CONNECTOR_PREFIX = PREFIX + "connector."
FORMAT = "step1x/bfl"
_DOWN, _UP, _ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"


def detect(keys: Sequence[str]) -> bool:
    """True for ``diffusion_model.*.lora_down.weight`` keys (the BFL / ComfyUI layout)."""
    return any(k.startswith(PREFIX) and k.endswith(_DOWN) for k in keys)


def parse(tensors: Mapping[str, Any]) -> dict[str, LoraWeights]:
    """``{module path: LoraWeights}`` of a file in this layout.

    Raises:
        LoraFormatError: A ``lora_down`` without its ``lora_up`` (or the reverse), or a key outside the layout.
    """
    out: dict[str, LoraWeights] = {}
    paths = {k[len(PREFIX) : -len(_DOWN)] for k in tensors if k.startswith(PREFIX) and k.endswith(_DOWN)}
    known = {f"{PREFIX}{p}{suffix}" for p in paths for suffix in (_DOWN, _UP, _ALPHA)}
    stray = sorted(set(tensors) - known)
    if stray:
        raise LoraFormatError(f"Step1X LoRA keys outside the {FORMAT} layout (or half pairs): {stray[:5]}")
    for path in sorted(paths):
        up = tensors.get(f"{PREFIX}{path}{_UP}")
        if up is None:
            raise LoraFormatError(f"Step1X LoRA layer {path} has lora_down but no lora_up; the file is incomplete")
        alpha = tensors.get(f"{PREFIX}{path}{_ALPHA}")
        value = None if alpha is None else alpha_value(alpha, f"{path}{_ALPHA}")
        out[path] = LoraWeights(tensors[f"{PREFIX}{path}{_DOWN}"], up, value)
    return out


def write(lora: Mapping[str, LoraWeights]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Canonical LoRA -> ``diffusion_model.<path>.lora_down/lora_up/alpha`` tensors (no metadata)."""
    out: dict[str, Tensor] = {}
    for path, w in lora.items():
        out[f"{PREFIX}{path}{_DOWN}"], out[f"{PREFIX}{path}{_UP}"] = w.down, w.up
        out[f"{PREFIX}{path}{_ALPHA}"] = torch.tensor(float(w.alpha if w.alpha is not None else w.rank))
    return out, {}


def layouts() -> list[LoraFormat]:
    """The family's LoRA layouts (for the plugin's ``register_lora_formats``)."""
    return [LoraFormat(FORMAT, "step1x", detect, parse, write)]
