"""``lora_encoder_inputs``: LoRA files in any FLUX.1 layout -> the per-layer ``(down, up, factor)`` the encoder reads.

A LoRA is read with the FLUX.1 family's registered layouts (``register_lora_formats``: diffusers/PEFT, kohya,
BFL/ComfyUI, XLabs, DiffSynth), found through the plugin registry (this plugin imports no family), which turn it
into the canonical fused form of :mod:`diffstudio.lora` (BFL paths, split q/k/v(/mlp) fused exactly, ``alpha``
kept). Each of the encoder's layers then takes its pair and ``factor = alpha / rank`` (applied once, in the layer
block: DiffSynth folds ``sqrt(alpha / rank)`` into both matrices, which is the same product).

* Layers of the LoRA the encoder does not read (``img_in``, ``txt_in``, ``final_layer``, CLIP layers) are ignored.
* Encoder layers the LoRA lacks: :class:`LoraEncoderMissingLayersError` naming them, unless
  ``lora_encoder_missing="zero"``; a zero-filled layer's block gives ``LN(0)``, i.e. its LayerNorm bias, so it
  still contributes tokens (it is not the same as "no contribution").
* A FLUX.2 LoRA (its metadata names FLUX.2, it names FLUX.2-only layers, or its widths are not FLUX.1's):
  :class:`LoraEncoderInputError` naming the argument.

Parsed pairs are cached per file (path, size, modification time) on the encoder module, so training over a data
set with a LoRA per sample reads and converts each file once.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diffstudio.config import ModelConfig
from diffstudio.dit.diffsynth_names import bfl_path
from diffstudio.errors import CheckpointError, PipelineInputError
from diffstudio.lora import LoraBaseModelError, LoraWeights, check_base_model, check_finite
from torch import Tensor, nn

from diffstudio_lora_encoder.model import FluxLoraEncoder

MISSING_POLICIES = ("error", "zero")
CACHE_SIZE = 8
"""LoRA files whose parsed pairs are kept per encoder (least recently used dropped first)."""

_FLUX2_MARKS = re.compile(r"double_stream_modulation|single_stream_modulation|to_qkv_mlp_proj")

Pairs = list["tuple[Tensor, Tensor, float] | None"]


class LoraEncoderInputError(PipelineInputError):
    """A ``lora_encoder_inputs`` entry is not a FLUX.1 LoRA the encoder can read (FLUX.2, other widths, bad file)."""


class LoraEncoderMissingLayersError(LoraEncoderInputError):
    """A LoRA lacks some of the encoder's layers and ``lora_encoder_missing`` is ``"error"``."""


def as_sources(value: Any) -> list[Any]:
    """One source or a list of them (path, ``ModelConfig``, state dict) -> a list.

    Raises:
        LoraEncoderInputError: An empty list or an entry of another type.
    """
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise LoraEncoderInputError("lora_encoder_inputs is an empty list; give a LoRA file (or None)")
    for i, item in enumerate(items):
        if not isinstance(item, (str, os.PathLike, ModelConfig, Mapping)):
            raise LoraEncoderInputError(
                f"lora_encoder_inputs[{i}] is a {type(item).__name__}; give a .safetensors path, a ModelConfig or a "
                "LoRA state dict"
            )
    return items


def _read(source: Any, where: str) -> tuple[dict[str, Tensor], dict[str, str] | None, str, tuple[Any, ...] | None]:
    """State dict, metadata, description and a cache key (None for state dicts) of one source."""
    from diffstudio.loading import Checkpoint

    if isinstance(source, ModelConfig):
        from diffstudio.resolve import resolve_files

        source = resolve_files(source).files[0]
    if isinstance(source, Mapping):
        return dict(source), None, "<state dict>", None
    path = Path(source)
    try:
        stat = path.stat()
        with Checkpoint.open(path) as checkpoint:
            return checkpoint.state_dict(), dict(checkpoint.metadata or {}), str(path), (
                str(path.resolve()), stat.st_size, stat.st_mtime_ns
            )  # fmt: skip
    except FileNotFoundError:
        raise LoraEncoderInputError(f"{where}: {path} does not exist; give the path of a LoRA file") from None
    except CheckpointError as error:
        raise LoraEncoderInputError(f"{where}: {error}") from error


def canonical_lora(runtime: Any, source: Any, where: str) -> tuple[dict[str, LoraWeights], str, tuple[Any, ...] | None]:
    """Read one source into the canonical fused form with the FLUX.1 layouts (``where`` names it in errors).

    Raises:
        LoraEncoderInputError: Unreadable, not a FLUX.1 LoRA (FLUX.2 metadata or layers), or no FLUX.1 layout
            (or several) recognises it; NaN/Inf values.
    """
    state, metadata, description, key = _read(source, where)
    try:
        check_base_model(metadata, "flux1", "the FLUX.1 LoRA encoder", description)
    except LoraBaseModelError as error:
        raise LoraEncoderInputError(f"{where}: {error}") from error
    names = list(state)
    if any(_FLUX2_MARKS.search(name) for name in names):
        raise LoraEncoderInputError(
            f"{where}: {description} names FLUX.2 layers (e.g. "
            f"{next(n for n in names if _FLUX2_MARKS.search(n))}); the LoRA encoder reads FLUX.1 LoRAs only"
        )
    formats = [fmt for fmt in runtime.hooks.lora_formats() if fmt.family == "flux1"]
    found = [fmt for fmt in formats if fmt.detect(names)]
    if len(found) != 1:
        what = "no FLUX.1 LoRA layout" if not found else f"several FLUX.1 LoRA layouts ({[f.name for f in found]})"
        install = "" if formats else " (install diffstudio-flux1, which registers them)"
        raise LoraEncoderInputError(
            f"{where}: {what} recognises {description}{install}; its first keys: {', '.join(names[:4])}"
        )
    try:
        parsed = found[0].to_canonical(state)
        lora = {k: v for k, v in getattr(parsed, "lora", parsed).items() if isinstance(v, LoraWeights)}
        check_finite(lora, description)
    except CheckpointError as error:  # the layouts' LoraFormatError, alphas, NaN/Inf
        raise LoraEncoderInputError(f"{where}: {description}: {error}") from error
    return lora, description, key


def align(encoder: FluxLoraEncoder, lora: Mapping[str, LoraWeights], description: str, where: str,
          missing: str) -> Pairs:  # fmt: skip
    """The encoder's per-layer ``(down, up, alpha / rank)`` (None for zero-filled layers).

    Raises:
        LoraEncoderInputError: A layer's widths differ from the encoder's (a FLUX.2 or other model's LoRA).
        LoraEncoderMissingLayersError: Layers are missing and ``missing`` is ``"error"``.
    """
    pairs: Pairs = []
    absent: list[str] = []
    for spec in encoder.layers:
        path = str(bfl_path(spec.key))
        weights = lora.get(path)
        if weights is None:
            absent.append(path)
            pairs.append(None)
            continue
        if (weights.down.shape[1], weights.up.shape[0]) != (spec.d_in, spec.d_out):
            raise LoraEncoderInputError(
                f"{where}: {description} maps {weights.down.shape[1]} -> {weights.up.shape[0]} features at {path}, "
                f"but FLUX.1's layer (and the encoder) has {spec.d_in} -> {spec.d_out}: it is a LoRA for another "
                "model (a FLUX.2 LoRA shares layer names with FLUX.1); the LoRA encoder reads FLUX.1 LoRAs only"
            )
        pairs.append((weights.down, weights.up, weights.factor))
    if len(absent) == len(pairs):
        raise LoraEncoderInputError(
            f"{where}: {description} has none of the {len(pairs)} DiT layers the LoRA encoder reads (e.g. "
            f"{', '.join(absent[:3])}); it is not a FLUX.1 DiT LoRA"
        )
    if absent and missing == "error":
        raise LoraEncoderMissingLayersError(
            f"{where}: {description} lacks {len(absent)} of the {len(pairs)} layers the LoRA encoder reads: "
            f"{', '.join(absent[:8])}{' ...' if len(absent) > 8 else ''}. Pass lora_encoder_missing='zero' to "
            "encode them as zero (each still adds its LayerNorm bias, so the token changes)"
        )
    return pairs


def encoder_pairs(encoder: FluxLoraEncoder, runtime: Any, sources: Sequence[Any], missing: str) -> list[Pairs]:
    """Each source's aligned pairs, cached per file on ``encoder`` (see the module docstring).

    Raises:
        PipelineInputError: ``missing`` is not ``"error"`` or ``"zero"``.
        LoraEncoderInputError: See :func:`canonical_lora` and :func:`align`.
    """
    if missing not in MISSING_POLICIES:
        raise PipelineInputError(f"lora_encoder_missing={missing!r}; use 'error' (default) or 'zero'")
    cache: OrderedDict[tuple[Any, ...], Pairs] = _cache(encoder)
    out = []
    for i, source in enumerate(sources):
        where = f"lora_encoder_inputs[{i}]"
        probe = _file_key(source)
        if probe is not None and (probe, missing) in cache:
            cache.move_to_end((probe, missing))
            out.append(cache[(probe, missing)])
            continue
        lora, description, key = canonical_lora(runtime, source, where)
        pairs = align(encoder, lora, description, where, missing)
        if key is not None:
            cache[(key, missing)] = pairs
            while len(cache) > CACHE_SIZE:
                cache.popitem(last=False)
        out.append(pairs)
    return out


def _file_key(source: Any) -> tuple[Any, ...] | None:
    if isinstance(source, ModelConfig) or not isinstance(source, (str, os.PathLike)):
        return None
    try:
        stat = Path(source).stat()
    except OSError:
        return None
    return (str(Path(source).resolve()), stat.st_size, stat.st_mtime_ns)


def _cache(encoder: nn.Module) -> OrderedDict[tuple[Any, ...], Pairs]:
    cache = encoder.__dict__.get("_lora_pairs")
    if not isinstance(cache, OrderedDict):
        cache = encoder.__dict__["_lora_pairs"] = OrderedDict()
    return cache
