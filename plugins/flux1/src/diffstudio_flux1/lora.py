"""LoRA at inference for FLUX.1: read a file in any published layout, apply it as a side path or fused, remove it.

Layouts and their mapping onto BFL module names are in :mod:`diffstudio_flux1.lora_formats`. A file becomes
the canonical form of :mod:`diffstudio.lora`; DiT layers get the LoRA through their ``DeltaLinear`` side paths
(``y = W x + scale * (alpha / r) * up @ down @ x``, weights untouched) or fused into the weights; CLIP layers
(kohya ``lora_te1_*``, diffusers ``text_encoder.*``) the same way once the CLIP model's ``nn.Linear`` layers are
turned into ``DeltaLinear`` (done on first use; the state dict is unchanged). Several LoRAs stack by name;
:func:`remove_lora` detaches a side path or restores fused weights exactly from copies kept when fusing.

Example::

    report = apply_lora(dit, "style.safetensors", scale=0.8, text_encoder=clip)
    print(report)          # what matched, and the keys that did not
    remove_lora(dit, report.name, text_encoder=clip)
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping
from typing import Any

from diffstudio.loading import Checkpoint
from diffstudio.lora import (
    AppliedLora,
    LoraArchitectureError,
    LoraMatchError,
    LoraNameError,
    LoraReport,
    LoraWeights,
    UnknownLoraFormatError,
    attach_lora,
    check_base_model,
    check_block_range,
    check_finite,
    detach_lora,
    keep_originals,
    lora_name,
    lora_state,
    match_layers,
    merge_lora,
    restore_fused,
)
from diffstudio.nn import DeltaLinear, delta_linears, to_delta_linears
from torch import Tensor, nn

from diffstudio_flux1.lora_formats import (
    PARSERS,
    TEXT_PREFIX,
    LoraError,
    LoraFormatError,
    ParsedLora,
    layouts,
    module_kind,
)

logger = logging.getLogger(__name__)
LoraSource = str | os.PathLike[str] | Mapping[str, Tensor]
"""A ``.safetensors`` path or a LoRA state dict in any FLUX.1 layout."""
_STATE = "_diffstudio_flux1_loras"

__all__ = [
    "LoraError",
    "LoraFormatError",
    "LoraMatchError",
    "LoraNameError",
    "LoraReport",
    "LoraSource",
    "UnknownLoraFormatError",
    "apply_lora",
    "canonical",
    "detect_lora_format",
    "list_loras",
    "load_lora",
    "remove_lora",
]


def detect_lora_format(keys: list[str], source: str = "the LoRA") -> str:
    """The one FLUX.1 layout whose names ``keys`` use.

    Raises:
        UnknownLoraFormatError: No layout (or several) matches; the message shows the first keys.
    """
    found = [fmt.name for fmt in layouts() if fmt.detect(keys)]
    if len(found) == 1:
        return found[0]
    first = ", ".join(keys[:6]) + (" ..." if len(keys) > 6 else "") if keys else "(no tensors)"
    if found:
        raise UnknownLoraFormatError(f"{source} matches several FLUX.1 LoRA layouts ({found}); its keys: {first}")
    raise UnknownLoraFormatError(
        f"{source} is not a FLUX.1 LoRA in any known layout (diffusers/PEFT, kohya, BFL/ComfyUI, XLabs, "
        f"DiffSynth). Its first keys: {first}. A FLUX.2 or SDXL LoRA names other layers."
    )


def load_lora(source: LoraSource, metadata: Mapping[str, str] | None = None) -> tuple[ParsedLora, str, str]:
    """Read a LoRA without applying it: ``(parsed, format name, source description)``.

    The file's alphas must be single finite numbers and its matrices free of NaN/Inf, and its metadata must not
    name another base model (a FLUX.2 or SDXL LoRA); ``metadata`` stands for a state dict's.

    Raises:
        UnknownLoraFormatError: See :func:`detect_lora_format`.
        LoraFormatError: Inconsistent tensors (pairs that do not fit, complex matrices).
        LoraAlphaError, LoraNonFiniteError, LoraBaseModelError: See :mod:`diffstudio.lora`.
        CheckpointError: The file cannot be read (pickles are refused, truncated files reported).
    """
    if isinstance(source, (str, os.PathLike)):
        with Checkpoint.open(source) as checkpoint:
            state = checkpoint.state_dict()
            metadata = checkpoint.metadata
        description = str(source)
    elif isinstance(source, Mapping):
        state, description = dict(source), "<state dict>"
    else:
        raise LoraFormatError(f"a LoRA source is a path or a state dict, not {type(source).__name__}")
    check_base_model(metadata, "flux1", "a FLUX.1 model", description)
    fmt = detect_lora_format(list(state), description)
    parsed = PARSERS[fmt](state)
    check_finite(parsed.lora, description)
    return parsed, fmt, description


def _layers(dit: nn.Module, text_encoder: nn.Module | None) -> dict[str, DeltaLinear]:
    layers = dict(delta_linears(dit))
    if text_encoder is not None:
        if not any(True for _ in delta_linears(text_encoder)):
            to_delta_linears(text_encoder)
        layers.update({TEXT_PREFIX + name: layer for name, layer in delta_linears(text_encoder)})
    return layers


def _split(lora: Mapping[str, LoraWeights]) -> tuple[dict[str, LoraWeights], dict[str, LoraWeights]]:
    dit = {k: w for k, w in lora.items() if not k.startswith(TEXT_PREFIX)}
    text = {k[len(TEXT_PREFIX) :]: w for k, w in lora.items() if k.startswith(TEXT_PREFIX)}
    return dit, text


def apply_lora(
    dit: nn.Module,
    source: LoraSource,
    *,
    scale: float = 1.0,
    name: str | None = None,
    fuse: bool = False,
    text_encoder: nn.Module | None = None,
    metadata: Mapping[str, str] | None = None,
) -> LoraReport:
    """Apply a LoRA to a FLUX.1 DiT (and its CLIP text encoder when the file has ``lora_te1_`` layers).

    Args:
        dit: The DiT (``Flux``).
        source: A ``.safetensors`` path or a state dict in any FLUX.1 layout.
        scale: Multiplier of the LoRA's update.
        name: Name to apply it under; default: the file's stem (``lora`` for dicts), made unique.
        fuse: Merge into the weights (no per-step cost; :func:`remove_lora` restores them exactly).
        text_encoder: The CLIP text model; without it, CLIP layers of the file are reported as unmatched.
        metadata: Safetensors metadata for a state-dict ``source`` (a file's own is read from the file).

    Raises:
        LoraNameError: ``name`` is already applied.
        LoraMatchError: Nothing matches, or a matched layer has other sizes.
        LoraArchitectureError: The LoRA names FLUX.2 layers or blocks beyond the DiT's depth.
        UnknownLoraFormatError, CheckpointError: See :func:`load_lora`.
    """
    parsed, fmt, description = load_lora(source, metadata)
    state = lora_state(dit, _STATE)
    name = lora_name(name, description, state.applied, f"remove_lora(dit, {name!r})")
    layers = _layers(dit, text_encoder)
    _check_architecture(parsed, layers, description)
    matched, unmatched = match_layers(parsed.lora, parsed.sources, parsed.unmatched, layers, description, "FLUX.1")
    dit_part, text_part = _split(matched)
    if fuse:
        keep_originals(state, layers, matched)
        merge_lora(dit, dit_part, scale)
        if text_part and text_encoder is not None:
            merge_lora(text_encoder, text_part, scale)
    else:
        attach_lora(dit, dit_part, name, scale)
        if text_part and text_encoder is not None:
            attach_lora(text_encoder, text_part, name, scale)
    report = LoraReport(
        name, fmt, description, float(scale), fuse, sum(len(parsed.sources[p]) for p in matched),
        dict(sorted(Counter(module_kind(p) for p in matched).items())), unmatched,
    )  # fmt: skip
    state.applied[name] = AppliedLora(report, matched)
    if unmatched:
        logger.warning("LoRA %r: %d keys were not applied: %s", name, len(unmatched), ", ".join(unmatched[:10]))
    return report


_FLUX2_ONLY = ("double_stream_modulation", "single_stream_modulation")


def _check_architecture(parsed: ParsedLora, layers: Mapping[str, DeltaLinear], description: str) -> None:
    """Refuse FLUX.2 LoRAs (FLUX.2-only layer names) and LoRAs for deeper models (block indices beyond ours)."""
    foreign = [key for key in parsed.unmatched if any(mark in key for mark in _FLUX2_ONLY)]
    if foreign:
        raise LoraArchitectureError(
            f"The LoRA {description} names FLUX.2 layers ({', '.join(foreign[:3])}); it is a FLUX.2 LoRA, and "
            "FLUX.1 shares enough layer names with FLUX.2 that parts of it would load. Use a LoRA trained for "
            "FLUX.1."
        )
    dit_paths = [path for path in parsed.lora if not path.startswith(TEXT_PREFIX)]
    check_block_range(dit_paths, [p for p in layers if not p.startswith(TEXT_PREFIX)], "this FLUX.1 DiT", description)


def remove_lora(dit: nn.Module, name: str, *, text_encoder: nn.Module | None = None) -> None:
    """Remove the LoRA applied as ``name`` (detach its side paths, or restore the fused weights exactly).

    Raises:
        LoraNameError: No LoRA of that name is applied.
    """
    state = lora_state(dit, _STATE)
    applied = state.applied.pop(name, None)
    if applied is None:
        raise LoraNameError(f"no LoRA named {name!r} is applied; applied: {sorted(state.applied) or 'none'}")
    if not applied.report.fused:
        detach_lora(dit, name)
        if text_encoder is not None:
            detach_lora(text_encoder, name)
        return
    restore_fused(state, _layers(dit, text_encoder), applied)


def list_loras(dit: nn.Module) -> list[LoraReport]:
    """Reports of the LoRAs applied to ``dit`` with :func:`apply_lora`, in application order."""
    return [a.report for a in lora_state(dit, _STATE).applied.values()]


def canonical(source: LoraSource) -> dict[str, Any]:
    """The canonical LoRA of a file or state dict (module path -> ``LoraWeights``), e.g. to train on or convert."""
    return dict(load_lora(source)[0].lora)
