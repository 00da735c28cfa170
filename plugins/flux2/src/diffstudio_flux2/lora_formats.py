"""FLUX.2 LoRA file layouts: key names, readers and writers.

A LoRA file names the layers it changes in one of three ways. Each is converted to the canonical form of
:mod:`diffstudio.lora` (module paths of our DiT ``Flux2``, which are BFL's names) and back:

``flux2/diffusers``
    PEFT keys over diffusers module names, ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight`` and
    ``lora_B``; the prefix may also be ``base_model.model.``, ``diffusion_model.`` or absent, and PEFT's adapter
    name may follow (``lora_A.default.weight``). Alphas come from ``.alpha`` tensors, else from the PEFT config
    that diffusers stores as JSON under the safetensors metadata key ``lora_adapter_metadata``, else they equal
    the rank. DiffSynth-Studio's own FLUX.2 LoRAs (diffusers names, no prefix, ``.default``, no alpha) are this
    layout too, so there is no separate ``flux2/diffsynth`` format.
``flux2/bfl``
    BFL names as ComfyUI, ai-toolkit and BFL write them: ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A
    .weight`` (prefix also ``model.diffusion_model.`` or absent; ``lora_down``/``lora_up`` accepted) with optional
    ``.alpha`` scalars.
``flux2/kohya``
    ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``: BFL names
    (or, from some trainers, diffusers names) with dots written as underscores.

diffusers splits the fused q/k/v projections of the double blocks into ``to_q/to_k/to_v`` (image stream) and
``add_{q,k,v}_proj`` (text stream). Split LoRAs are fused exactly: ``down`` is the concatenation of the parts'
``down`` matrices ``(r_q + r_k + r_v, in)`` and ``up`` is block diagonal ``(3 * out, r_q + r_k + r_v)``, so the
dense update of each output slice is its own part's. A part missing from the file leaves its rows zero. The
other direction splits a fused LoRA back into compact parts when ``up`` is block diagonal, and otherwise gives
every part the whole ``down`` and its rows of ``up``; both are exact. diffusers' final-norm projection
``norm_out.linear`` holds (scale, shift) where BFL's ``final_layer.adaLN_modulation.1`` holds (shift, scale), so
the halves of ``up`` are swapped on the way.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffstudio.lora import CanonicalLora, LoraWeights, alpha_value
from diffstudio.types import LoraFormat
from torch import Tensor

from diffstudio_flux2.lora_keys import (
    BFL,
    DIFFUSERS,
    KOHYA,
    LoraError,
    LoraFormatError,
    Target,
    detect_bfl,
    detect_diffusers,
    detect_kohya,
    diffusers_modules,
    kohya_target,
    module_kind,
    prefixed_target,
    split_key,
)
from diffstudio_flux2.lora_qkv import fuse_lora_parts, split_lora_parts

__all__ = [
    "ADAPTER_METADATA_KEY",
    "BFL",
    "DIFFUSERS",
    "KOHYA",
    "PARSERS",
    "LoraError",
    "LoraFormatError",
    "ParsedLora",
    "fuse_lora_parts",
    "layouts",
    "module_kind",
    "parse_bfl",
    "parse_diffusers",
    "parse_kohya",
    "peft_alphas",
    "split_lora_parts",
    "to_bfl",
    "to_diffusers",
    "to_kohya",
]

ADAPTER_METADATA_KEY = "lora_adapter_metadata"
"""The safetensors metadata key under which diffusers stores the PEFT ``LoraConfig`` as JSON."""
_ARCHITECTURES = {6144: "flux-2-dev", 3072: "flux-2-klein-4b", 4096: "flux-2-klein-9b"}  # by hidden size


# --- reading


@dataclass
class ParsedLora:
    """A LoRA read from a file layout, with provenance.

    Attributes:
        lora: The canonical LoRA (our module path -> pair).
        sources: For each canonical module, the file keys it was built from.
        unmatched: File keys that are not part of any usable LoRA pair, in file order.
    """

    lora: CanonicalLora = field(default_factory=dict)
    sources: dict[str, list[str]] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)


@dataclass
class _Group:
    name: str
    target: Target
    down: Tensor | None = None
    up: Tensor | None = None
    alpha: float | None = None
    keys: list[str] = field(default_factory=list)


AlphaLookup = Callable[[str, int], "float | None"]


def peft_alphas(metadata: Mapping[str, str] | None) -> AlphaLookup | None:
    """Alphas from the PEFT ``LoraConfig`` stored by diffusers, as ``lookup(diffusers_name, rank)``.

    Reads ``lora_alpha`` and ``alpha_pattern`` (PEFT's matching: a pattern matches a module name or one of its
    dotted suffixes) under the ``transformer.`` namespace or bare; ``use_rslora`` (scale ``alpha / sqrt(r)``)
    is turned into the equivalent plain alpha. Returns None when the metadata has no such config.

    Raises:
        LoraFormatError: The config is not valid JSON.
    """
    raw = (metadata or {}).get(ADAPTER_METADATA_KEY)
    if not raw:
        return None
    where = f"in the {ADAPTER_METADATA_KEY!r} metadata"
    try:
        config = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise LoraFormatError(f"the {ADAPTER_METADATA_KEY!r} metadata is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        return None
    scoped = {k.removeprefix("transformer."): v for k, v in config.items() if k.startswith("transformer.")}
    config = scoped or config
    default = config.get("lora_alpha")
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise LoraFormatError(f"alpha_pattern {where} must be an object of patterns to alphas, got {patterns!r:.60}")
    compiled = [(_peft_pattern(pattern, where), value) for pattern, value in patterns.items()]
    rslora = bool(config.get("use_rslora", False))

    def lookup(name: str, rank: int) -> float | None:
        alpha = default
        for pattern, value in compiled:
            if pattern is not None and pattern.match(name):
                alpha = value
                break
        if alpha is None:
            return None
        number = alpha_value(alpha, f"of {name} {where}")
        return number * math.sqrt(rank) if rslora else number

    return lookup


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


_NESTED_QUANTIFIER = re.compile(r"\)[*+?{]|[*+][*+{]")


def _peft_pattern(pattern: str, where: str) -> re.Pattern[str] | None:
    """PEFT's matching of an ``alpha_pattern`` key (the name or one of its dotted suffixes), compiled once.

    Patterns come from the file, so ones that could backtrack for long (a quantified group, stacked quantifiers,
    more than 200 characters) are refused; PEFT's own patterns are module names. Invalid regexes match nothing.

    Raises:
        LoraFormatError: A pattern that could take exponential time.
    """
    if len(pattern) > 200 or _NESTED_QUANTIFIER.search(pattern):
        raise LoraFormatError(f"alpha_pattern key {pattern!r:.60} {where} is not a plain module-name pattern")
    try:
        return re.compile(rf"(.*\.)?({pattern})$")
    except re.error:
        return None


def _groups(
    state_dict: Mapping[str, Any], resolve: Callable[[str], tuple[str, Target] | None]
) -> tuple[dict[str, _Group], list[str]]:
    groups: dict[str, _Group] = {}
    unmatched: list[str] = []
    for key, value in state_dict.items():
        parts = split_key(key)
        found = None if parts is None else resolve(parts[0])
        if parts is None or found is None or not isinstance(value, Tensor):
            unmatched.append(key)
            continue
        module, role = parts
        group = groups.setdefault(module, _Group(found[0], found[1]))
        group.keys.append(key)
        if role == "alpha":
            group.alpha = alpha_value(value, key)
        elif getattr(group, role) is not None:
            raise LoraFormatError(f"{key}: the LoRA {role} matrix of {module} appears twice")
        else:
            setattr(group, role, value)
    return groups, unmatched


def _assemble(groups: Mapping[str, _Group], unmatched: list[str], alpha_of: AlphaLookup | None = None) -> ParsedLora:
    parsed = ParsedLora(unmatched=unmatched)
    parts: dict[str, dict[int, tuple[LoraWeights, list[str]]]] = {}
    for module, group in groups.items():
        if group.down is None or group.up is None:
            parsed.unmatched.extend(group.keys)  # half a pair, or an alpha alone
            continue
        alpha = group.alpha
        if alpha is None and alpha_of is not None:
            alpha = alpha_of(group.name, int(group.down.shape[0]))
        up = group.up
        if group.target.swap:
            if up.ndim != 2 or up.shape[0] % 2:
                raise LoraFormatError(f"{module}: up matrix {tuple(up.shape)} cannot be split into two halves")
            first, second = up.chunk(2, dim=0)
            up = torch.cat([second, first], dim=0)
        try:
            weights = LoraWeights(group.down, up, alpha)
        except ValueError as exc:
            raise LoraFormatError(f"{module}: {exc}") from None
        path, slot = group.target.path, group.target.slot
        taken = path in parsed.lora or (slot is None and path in parts)
        if slot is not None:
            taken = taken or slot in parts.get(path, {})
        if taken:
            raise LoraFormatError(f"{module}: a second LoRA for the layer {path} (the file names it twice)")
        if slot is None:
            parsed.lora[path] = weights
            parsed.sources[path] = list(group.keys)
        else:
            parts.setdefault(path, {})[slot] = (weights, list(group.keys))
    for path, found in sorted(parts.items()):
        slots = [found[i][0] if i in found else None for i in range(3)]
        try:
            parsed.lora[path] = fuse_lora_parts(slots)
        except ValueError as exc:
            raise LoraFormatError(f"the q/k/v LoRAs of {path} cannot be fused: {exc}") from None
        parsed.sources[path] = [key for i in sorted(found) for key in found[i][1]]
    return parsed


def parse_diffusers(state_dict: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> ParsedLora:
    """Read a diffusers/PEFT (or DiffSynth) FLUX.2 LoRA; see the module docstring."""
    groups, unmatched = _groups(state_dict, lambda module: prefixed_target(module, "diffusers"))
    return _assemble(groups, unmatched, peft_alphas(metadata))


def parse_bfl(state_dict: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> ParsedLora:
    """Read a BFL/ComfyUI/ai-toolkit FLUX.2 LoRA (``metadata`` is not needed)."""
    groups, unmatched = _groups(state_dict, lambda module: prefixed_target(module, "bfl"))
    return _assemble(groups, unmatched)


def parse_kohya(state_dict: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> ParsedLora:
    """Read a kohya ``lora_unet_*`` FLUX.2 LoRA (``metadata`` is not needed)."""

    def resolve(module: str) -> tuple[str, Target] | None:
        target = kohya_target(module)
        return None if target is None else (module, target)

    groups, unmatched = _groups(state_dict, resolve)
    return _assemble(groups, unmatched)


PARSERS: dict[str, Callable[[Mapping[str, Any], Mapping[str, str] | None], ParsedLora]] = {
    DIFFUSERS: parse_diffusers,
    BFL: parse_bfl,
    KOHYA: parse_kohya,
}


# --- writing


def _own(tensor: Tensor) -> Tensor:
    """A contiguous copy with its own storage (split q/k/v parts share ``down``; safetensors refuses shared memory)."""
    return tensor.detach().clone(memory_format=torch.contiguous_format)


def _alpha_value(weights: LoraWeights) -> float:
    return float(weights.rank) if weights.alpha is None else float(weights.alpha)


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _architecture(lora: Mapping[str, LoraWeights]) -> str:
    for path, weights in lora.items():
        if re.search(r"(img_attn\.qkv|txt_attn\.qkv|linear1|modulation\w*\.lin)$", path):
            return _ARCHITECTURES.get(int(weights.down.shape[1]), "flux-2")
    return "flux-2"


def _check(lora: Mapping[str, Any]) -> None:
    if not lora:
        raise LoraFormatError("the LoRA is empty; there is nothing to write")
    wrong = [key for key, value in lora.items() if not isinstance(value, LoraWeights)]
    if wrong:
        raise LoraFormatError(f"writers take a canonical LoRA (module path -> LoraWeights); got {wrong[:3]}")


def to_diffusers(lora: Mapping[str, Any], *, prefix: str = "transformer.") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Write a canonical LoRA as diffusers/PEFT keys (``transformer.<diffusers name>.lora_A.weight``).

    Fused q/k/v LoRAs are split exactly (:func:`split_lora_parts`). Alphas go into the PEFT ``LoraConfig``
    stored as JSON under the ``lora_adapter_metadata`` metadata key (``r``/``lora_alpha`` plus
    ``rank_pattern``/``alpha_pattern`` for modules that differ), which diffusers' ``load_lora_weights`` reads;
    tools that ignore that metadata assume ``alpha = rank``, so prefer the ``bfl`` layout for them when alphas
    differ from ranks.

    Args:
        lora: Canonical LoRA.
        prefix: Key prefix; ``""`` gives DiffSynth's prefix-less keys.

    Returns:
        The state dict (contiguous tensors, none sharing storage) and the safetensors metadata.

    Raises:
        LoraFormatError: The LoRA is empty or names a module the FLUX.2 DiT does not have.
    """
    _check(lora)
    state: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, int | float] = {}
    for path, weights in lora.items():
        modules = diffusers_modules(path)
        pieces = split_lora_parts(weights, len(modules)) if len(modules) > 1 else [weights]
        for (name, _, swap), piece in zip(modules, pieces):
            if piece is None:
                continue
            up = torch.cat(piece.up.chunk(2, dim=0)[::-1], dim=0) if swap else piece.up
            state[f"{prefix}{name}.lora_A.weight"] = _own(piece.down)
            state[f"{prefix}{name}.lora_B.weight"] = _own(up)
            ranks[name] = piece.rank
            alphas[name] = _number(_alpha_value(piece))
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {f"^{name}": r for name, r in sorted(ranks.items()) if r != rank},
        "alpha_pattern": {f"^{name}": a for name, a in sorted(alphas.items()) if a != alpha},
        "use_dora": False,
        "lora_bias": False,
    }
    packed = {f"transformer.{key}": value for key, value in config.items()}
    return state, {"format": "pt", ADAPTER_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}


def to_bfl(lora: Mapping[str, Any], *, prefix: str = "diffusion_model.") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Write a canonical LoRA with BFL names, as ComfyUI reads them (``diffusion_model.<path>.lora_A.weight``).

    An ``.alpha`` scalar is written for modules whose alpha differs from their rank (files without alphas also
    load in diffusers' ai-toolkit reader).

    Raises:
        LoraFormatError: The LoRA is empty or names a module the FLUX.2 DiT does not have.
    """
    _check(lora)
    state: dict[str, Tensor] = {}
    for path, weights in lora.items():
        diffusers_modules(path)  # validates the name
        state[f"{prefix}{path}.lora_A.weight"] = _own(weights.down)
        state[f"{prefix}{path}.lora_B.weight"] = _own(weights.up)
        if weights.alpha is not None and float(weights.alpha) != weights.rank:
            state[f"{prefix}{path}.alpha"] = torch.tensor(float(weights.alpha), dtype=torch.float32)
    return state, {"modelspec.architecture": f"{_architecture(lora)}/lora"}


def to_kohya(lora: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Write a canonical LoRA in kohya's layout (``lora_unet_<BFL name with underscores>.lora_down.weight``).

    Every module gets an ``.alpha`` scalar. Metadata: ``ss_network_dim`` / ``ss_network_alpha`` (the most
    common rank and alpha), ``ss_base_model_version`` and ``modelspec.architecture`` (the variant guessed from
    the hidden size).

    Raises:
        LoraFormatError: The LoRA is empty or names a module the FLUX.2 DiT does not have.
    """
    _check(lora)
    state: dict[str, Tensor] = {}
    for path, weights in lora.items():
        diffusers_modules(path)
        name = "lora_unet_" + path.replace(".", "_")
        state[f"{name}.lora_down.weight"] = _own(weights.down)
        state[f"{name}.lora_up.weight"] = _own(weights.up)
        state[f"{name}.alpha"] = torch.tensor(_alpha_value(weights), dtype=torch.float32)
    rank = Counter(w.rank for w in lora.values()).most_common(1)[0][0]
    alpha = Counter(_alpha_value(w) for w in lora.values()).most_common(1)[0][0]
    metadata = {
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(_number(alpha)),
        "ss_base_model_version": "flux2",
        "modelspec.architecture": f"{_architecture(lora)}/lora",
    }
    return state, metadata


def _reader(layout: str) -> Callable[..., CanonicalLora]:
    parse = PARSERS[layout]

    def to_canonical(state_dict: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> CanonicalLora:
        return parse(state_dict, metadata).lora

    to_canonical.__doc__ = f"Convert a {layout} LoRA state dict to the canonical form (unknown keys are dropped)."
    return to_canonical


def layouts() -> list[LoraFormat]:
    """The FLUX.2 LoRA layouts, each with a reader and a writer."""
    return [
        LoraFormat(DIFFUSERS, "flux2", detect_diffusers, _reader(DIFFUSERS), to_diffusers),
        LoraFormat(BFL, "flux2", detect_bfl, _reader(BFL), to_bfl),
        LoraFormat(KOHYA, "flux2", detect_kohya, _reader(KOHYA), to_kohya),
    ]
