"""LoRA at inference for the FLUX.2 DiT: read a file in any published layout, apply, stack, remove.

The layouts (diffusers/PEFT and DiffSynth, BFL/ComfyUI/ai-toolkit, kohya) are described in
:mod:`diffstudio_flux2.lora_formats`. Every file is turned into the canonical form of :mod:`diffstudio.lora`
(module path of one of our ``DeltaLinear`` layers -> ``LoraWeights``) and applied either as a side path (the
default: ``y = W x + scale * (alpha / r) * up @ down @ x``, weights untouched) or fused into the weights. Several
LoRAs stack, each under its own name and scale, and :func:`remove_lora` undoes one: a side path is detached; for
a fused LoRA the weights it touched are restored bit for bit from copies kept (on the CPU) when they were first
fused, and the other fused LoRAs on those layers are merged again in their original order.

Example::

    report = apply_lora(dit, "style.safetensors", scale=0.8)
    print(report)  # what matched, and which keys did not
    remove_lora(dit, report.name)
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diffstudio._io import atomic_write_bytes
from diffstudio.loading import Checkpoint
from diffstudio.lora import (
    AmbiguousLoraFormatError,
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
    lora_names,
    lora_state,
    match_layers,
    merge_lora,
    restore_fused,
)
from diffstudio.nn import DeltaLinear, delta_linears
from diffstudio.types import LoraFormat
from torch import Tensor, nn

from diffstudio_flux2.lora_formats import (
    BFL,
    DIFFUSERS,
    KOHYA,
    PARSERS,
    LoraError,
    LoraFormatError,
    ParsedLora,
    fuse_lora_parts,
    layouts,
    module_kind,
    split_lora_parts,
)

__all__ = [
    "AmbiguousLoraFormatError",
    "LoraError",
    "LoraFormatError",
    "LoraMatchError",
    "LoraNameError",
    "LoraReport",
    "LoraSource",
    "UnknownLoraFormatError",
    "apply_lora",
    "detect_lora_format",
    "fuse_lora_parts",
    "list_loras",
    "load_lora",
    "lora_formats",
    "read_lora_file",
    "remove_lora",
    "save_lora_file",
    "split_lora_parts",
]

logger = logging.getLogger(__name__)

LoraSource = str | os.PathLike[str] | Mapping[str, Tensor] | Mapping[str, LoraWeights]
"""A ``.safetensors`` path, a LoRA state dict in any layout, or a canonical LoRA."""

_STATE_ATTRIBUTE = "_diffstudio_flux2_loras"
_WRITERS = {"diffusers": DIFFUSERS, "bfl": BFL, "comfy": BFL, "kohya": KOHYA}
_EXAMPLES = (  # one key per layout, in the order of lora_formats()
    "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
    "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight",
    "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
)


def lora_formats() -> list[LoraFormat]:
    """Every FLUX.2 LoRA layout (for the plugin's ``register_lora_formats`` hook)."""
    return layouts()


def read_lora_file(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a LoRA ``.safetensors`` file with the project's validating reader.

    Args:
        path: The file (a folder holding one ``.safetensors`` file also works).

    Returns:
        ``(tensors, metadata)``: memory-mapped CPU tensors by name, and the safetensors ``__metadata__``.

    Raises:
        PickleRefusedError: A ``.bin/.pt/.pth/.ckpt`` pickle (refused: unpickling can run code).
        SafetensorsFormatError: The file is truncated or corrupt.
        CheckpointError: Other subclasses for missing or unsupported files.
    """
    with Checkpoint.open(path) as checkpoint:
        return checkpoint.state_dict(), checkpoint.metadata


def detect_lora_format(keys: Sequence[str], *, source: str = "the LoRA") -> LoraFormat:
    """Find the one FLUX.2 layout whose names ``keys`` use.

    Raises:
        UnknownLoraFormatError: No layout matches (the message shows the first keys and the known layouts).
        AmbiguousLoraFormatError: Several match (e.g. a file mixing BFL and diffusers names).
    """
    keys = list(keys)
    found = [fmt for fmt in lora_formats() if fmt.detect(keys)]
    if len(found) == 1:
        return found[0]
    known = ", ".join(f"{fmt.name} ({example})" for fmt, example in zip(lora_formats(), _EXAMPLES))
    first = ", ".join(keys[:6]) + (" ..." if len(keys) > 6 else "") if keys else "(no tensors)"
    if not found:
        raise UnknownLoraFormatError(
            f"{source} is not a FLUX.2 LoRA in any known layout. Its first keys: {first}. Known layouts: {known}. "
            "Check that the LoRA was trained for FLUX.2 (a FLUX.1 or SDXL LoRA names other layers)."
        )
    raise AmbiguousLoraFormatError(
        f"{source} matches several FLUX.2 LoRA layouts ({', '.join(fmt.name for fmt in found)}); its first keys: "
        f"{first}. A file should use one naming scheme; convert it to one layout first."
    )


def load_lora(source: LoraSource, metadata: Mapping[str, str] | None = None) -> tuple[ParsedLora, str, str]:
    """Read a LoRA from a file, a state dict or a canonical LoRA, without applying it.

    Args:
        source: See :data:`LoraSource`.
        metadata: Safetensors metadata for a state dict (a file's own metadata is read from the file).

    Returns:
        ``(parsed, format name, source description)``; ``parsed.lora`` is the canonical LoRA.

    The file's alphas must be single finite numbers and its matrices free of NaN/Inf, and its metadata must not
    name another base model (a FLUX.1 or SDXL LoRA).

    Raises:
        UnknownLoraFormatError, AmbiguousLoraFormatError: See :func:`detect_lora_format`.
        LoraFormatError: Inconsistent tensors (e.g. a pair whose ranks differ).
        LoraAlphaError, LoraNonFiniteError, LoraBaseModelError: See :mod:`diffstudio.lora`.
        CheckpointError: The file cannot be read (see :func:`read_lora_file`).
    """
    state: dict[str, Any]
    if isinstance(source, (str, os.PathLike)):
        state, metadata = read_lora_file(source)
        description = str(source)
    elif isinstance(source, Mapping):
        state, description = dict(source.items()), "<state dict>"
        if state and all(isinstance(value, LoraWeights) for value in state.values()):
            check_finite(state, "<canonical LoRA>")
            return ParsedLora(state, {key: [key] for key in state}), "canonical", "<canonical LoRA>"
    else:
        raise LoraFormatError(f"a LoRA source is a path, a state dict or a canonical LoRA, not {type(source).__name__}")
    check_base_model(metadata, "flux2", "a FLUX.2 model", description)
    fmt = detect_lora_format(list(state), source=description)
    parsed = PARSERS[fmt.name](state, metadata)
    check_finite(parsed.lora, description)
    return parsed, fmt.name, description


_FLUX1_ONLY = re.compile(  # per-block modulations and the pooled-text embedder exist in FLUX.1 only
    r"(img_mod|txt_mod)[._]lin|single_blocks[._]\d+[._]modulation[._]lin|vector_in|norm1_context|norm1\.linear"
    r"|time_text_embed"
)


def _check_architecture(parsed: ParsedLora, layers: Mapping[str, DeltaLinear], description: str) -> None:
    """Refuse FLUX.1 LoRAs (FLUX.1-only layer names) and LoRAs for deeper models (block indices beyond ours)."""
    foreign = [key for key in parsed.unmatched if _FLUX1_ONLY.search(key)]
    if foreign:
        raise LoraArchitectureError(
            f"The LoRA {description} names FLUX.1 layers ({', '.join(foreign[:3])}); it is a FLUX.1 LoRA, and FLUX.2 "
            "shares enough layer names and widths with FLUX.1 (FLUX.2-klein-4B with FLUX.1-dev) that parts of it "
            "would load. Use a LoRA trained for FLUX.2."
        )
    check_block_range(parsed.lora, layers, "this FLUX.2 DiT", description)


def apply_lora(
    model: nn.Module,
    source: LoraSource,
    *,
    scale: float = 1.0,
    name: str | None = None,
    fuse: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> LoraReport:
    """Apply a LoRA to a FLUX.2 DiT.

    Args:
        model: The DiT (``Flux2``; any module whose ``DeltaLinear`` paths use BFL names works).
        source: A ``.safetensors`` path, a state dict in any FLUX.2 layout, or a canonical LoRA.
        scale: Multiplier of the LoRA's update.
        name: Name to apply it under; default: the file's stem (``lora`` for dicts), made unique.
        fuse: Merge into the weights (no per-step cost; :func:`remove_lora` restores the weights exactly)
            instead of adding a side path.
        metadata: Safetensors metadata for a state-dict ``source`` (alphas in a diffusers PEFT config).

    Returns:
        The report; keys that were not applied are listed there and logged as a warning.

    Raises:
        LoraNameError: ``name`` is already applied to this model.
        LoraMatchError: The LoRA matches none of the model's layers, or a layer has other sizes.
        LoraArchitectureError: The LoRA names FLUX.1 layers or blocks beyond the DiT's depth.
        UnknownLoraFormatError, AmbiguousLoraFormatError, LoraFormatError, CheckpointError: See :func:`load_lora`.
    """
    parsed, fmt, description = load_lora(source, metadata)
    state = lora_state(model, _STATE_ATTRIBUTE)
    name = lora_name(name, description, set(state.applied) | set(lora_names(model)), f"remove_lora(model, {name!r})")
    layers = dict(delta_linears(model))
    _check_architecture(parsed, layers, description)
    matched, unmatched = match_layers(parsed.lora, parsed.sources, parsed.unmatched, layers, description, "FLUX.2")
    if fuse:
        keep_originals(state, layers, matched)
        merge_lora(model, matched, scale)
    else:
        attach_lora(model, matched, name, scale)
    counts = Counter(module_kind(path) for path in matched)
    report = LoraReport(
        name=name,
        format=fmt,
        source=description,
        scale=float(scale),
        fused=fuse,
        tensors_matched=sum(len(parsed.sources.get(path, [path])) for path in matched),
        modules=dict(sorted(counts.items())),
        unmatched_keys=unmatched,
    )
    state.applied[name] = AppliedLora(report, matched)
    if unmatched:
        logger.warning(
            "LoRA %r (%s): %d of its keys were not applied: %s%s",
            name,
            description,
            len(unmatched),
            ", ".join(unmatched[:10]),
            " ..." if len(unmatched) > 10 else "",
        )
    return report


def remove_lora(model: nn.Module, name: str) -> None:
    """Remove the LoRA applied as ``name``: detach its side paths, or restore the weights it was fused into.

    Restoring is exact: a layer's weight is set back to the copy taken before the first fused LoRA touched it,
    and the fused LoRAs still applied to that layer are merged again in their original order.

    Raises:
        LoraNameError: No LoRA of that name is applied.
    """
    state = lora_state(model, _STATE_ATTRIBUTE)
    applied = state.applied.get(name)
    if applied is None:
        if name in lora_names(model):  # a side path attached directly with diffstudio.lora.attach_lora
            detach_lora(model, name)
            return
        raise LoraNameError(f"no LoRA named {name!r} is applied; applied: {sorted(state.applied) or 'none'}")
    del state.applied[name]
    if not applied.report.fused:
        detach_lora(model, name)
        return
    restore_fused(state, dict(delta_linears(model)), applied)


def list_loras(model: nn.Module) -> list[LoraReport]:
    """The reports of the LoRAs applied to ``model`` with :func:`apply_lora`, in application order."""
    return [applied.report for applied in lora_state(model, _STATE_ATTRIBUTE).applied.values()]


def save_lora_file(lora: Mapping[str, LoraWeights], path: str | os.PathLike[str], *, layout: str = "diffusers") -> Path:
    """Write a canonical LoRA to ``path`` in a published layout, atomically.

    Args:
        lora: Canonical LoRA (e.g. from ``diffstudio.lora.collect_lora`` after training).
        path: Target ``.safetensors`` file.
        layout: ``"diffusers"`` (PEFT keys, config in metadata), ``"bfl"`` / ``"comfy"`` (ComfyUI) or
            ``"kohya"``; a format name such as ``"flux2/kohya"`` works too.

    Returns:
        The path written.

    Raises:
        ValueError: Unknown layout.
        LoraFormatError: See the layout's writer in :mod:`diffstudio_flux2.lora_formats`.
    """
    from safetensors.torch import save

    fmt_name = _WRITERS.get(layout, layout)
    formats = {fmt.name: fmt for fmt in lora_formats()}
    fmt = formats.get(fmt_name)
    if fmt is None or fmt.from_canonical is None:
        raise ValueError(f"unknown LoRA layout {layout!r}; choose one of {sorted(_WRITERS)}")
    tensors, metadata = fmt.from_canonical(lora)
    data: Any = save({key: value.contiguous() for key, value in tensors.items()}, metadata=metadata)
    return atomic_write_bytes(path, bytes(data))
