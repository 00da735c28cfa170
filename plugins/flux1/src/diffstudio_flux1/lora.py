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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffstudio.loading import Checkpoint
from diffstudio.lora import (
    LoraArchitectureError,
    LoraWeights,
    attach_lora,
    check_base_model,
    check_block_range,
    check_finite,
    detach_lora,
    merge_lora,
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


class UnknownLoraFormatError(LoraError):
    """No FLUX.1 LoRA layout (or more than one) recognises a file's keys."""


class LoraMatchError(LoraError):
    """A LoRA matches none of the model's layers, or a matched layer has other sizes."""


class LoraNameError(LoraError, KeyError):
    """A LoRA name is unknown (remove) or already in use (apply)."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class LoraReport:
    """What :func:`apply_lora` did.

    Attributes:
        name: The name the LoRA is applied under (pass it to :func:`remove_lora`).
        format: The layout read, e.g. ``"flux1/kohya"``.
        source: Where it came from (a path, or ``"<state dict>"``).
        scale: The multiplier it was applied with.
        fused: True when merged into the weights, False for a side path.
        tensors_matched: File tensors (down/up/alpha) that went into applied layers.
        modules: Applied layers counted per kind, e.g. ``{"double_blocks.*.img_attn.qkv": 19}``.
        unmatched_keys: File keys that were not applied (unknown names, layers the model lacks, half pairs).
    """

    name: str
    format: str
    source: str
    scale: float
    fused: bool
    tensors_matched: int
    modules: dict[str, int]
    unmatched_keys: list[str] = field(default_factory=list)

    @property
    def modules_matched(self) -> int:
        """Number of layers the LoRA changes."""
        return sum(self.modules.values())

    def __str__(self) -> str:
        how = "fused into the weights" if self.fused else "as a side path"
        kinds = ", ".join(f"{kind} x{count}" for kind, count in sorted(self.modules.items()))
        text = (
            f"LoRA {self.name!r} ({self.format}, from {self.source}) applied {how} with scale {self.scale:g}: "
            f"{self.tensors_matched} tensors matched {self.modules_matched} layers ({kinds})."
        )
        if self.unmatched_keys:
            shown = ", ".join(self.unmatched_keys[:8]) + (" ..." if len(self.unmatched_keys) > 8 else "")
            return text + f" {len(self.unmatched_keys)} keys were not applied: {shown}."
        return text + " Every key was applied."


@dataclass
class _Applied:
    report: LoraReport
    lora: dict[str, LoraWeights]  # matched layers, canonical paths


@dataclass
class _State:
    applied: dict[str, _Applied] = field(default_factory=dict)
    originals: dict[str, Tensor] = field(default_factory=dict)  # canonical path -> weight before fusing


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


def _state(model: nn.Module) -> _State:
    state = model.__dict__.get(_STATE)
    if not isinstance(state, _State):
        state = model.__dict__[_STATE] = _State()
    return state


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
    state = _state(dit)
    if name is None:
        stem = Path(description).stem if not description.startswith("<") else "lora"
        name, counter = stem, 1
        while name in state.applied:
            counter += 1
            name = f"{stem}_{counter}"
    elif name in state.applied:
        raise LoraNameError(f"a LoRA named {name!r} is already applied; remove_lora(dit, {name!r}) first")
    layers = _layers(dit, text_encoder)
    _check_architecture(parsed, layers, description)
    matched = {path: w for path, w in parsed.lora.items() if path in layers}
    unmatched = parsed.unmatched + [k for path in parsed.lora if path not in layers for k in parsed.sources[path]]
    wrong = [
        f"{path} (LoRA {w.down.shape[1]} -> {w.up.shape[0]}, layer {layers[path].in_features} -> "
        f"{layers[path].out_features})"
        for path, w in matched.items()
        if (w.down.shape[1], w.up.shape[0]) != (layers[path].in_features, layers[path].out_features)
    ]
    if wrong:
        raise LoraMatchError(f"{description} does not fit this model: {'; '.join(wrong[:3])}")
    if not matched:
        raise LoraMatchError(
            f"{description} ({fmt}) matches none of the model's layers ({len(unmatched)} keys, e.g. "
            f"{', '.join(unmatched[:4])}); LoRA-capable layers look like {', '.join(sorted(layers)[:3])}."
        )
    dit_part, text_part = _split(matched)
    if fuse:
        with torch.no_grad():
            for path in matched:
                state.originals.setdefault(path, layers[path].weight.detach().to("cpu", copy=True))
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
    state.applied[name] = _Applied(report, matched)
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
    state = _state(dit)
    applied = state.applied.pop(name, None)
    if applied is None:
        raise LoraNameError(f"no LoRA named {name!r} is applied; applied: {sorted(state.applied) or 'none'}")
    if not applied.report.fused:
        detach_lora(dit, name)
        if text_encoder is not None:
            detach_lora(text_encoder, name)
        return
    layers = _layers(dit, text_encoder)
    with torch.no_grad():
        for path in applied.lora:
            layers[path].weight.copy_(state.originals[path])
            for other in (a for a in state.applied.values() if a.report.fused and path in a.lora):
                delta = other.report.scale * other.lora[path].delta_weight()
                layers[path].weight.add_(delta.to(layers[path].weight))
            if not any(path in a.lora for a in state.applied.values() if a.report.fused):
                del state.originals[path]


def list_loras(dit: nn.Module) -> list[LoraReport]:
    """Reports of the LoRAs applied to ``dit`` with :func:`apply_lora`, in application order."""
    return [a.report for a in _state(dit).applied.values()]


def canonical(source: LoraSource) -> dict[str, Any]:
    """The canonical LoRA of a file or state dict (module path -> ``LoraWeights``), e.g. to train on or convert."""
    return dict(load_lora(source)[0].lora)
