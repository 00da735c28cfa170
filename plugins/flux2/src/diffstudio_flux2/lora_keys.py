"""FLUX.2 LoRA key names: which layer of our DiT a file's key names, in BFL, diffusers and kohya spelling.

A LoRA key is ``<prefix><module><role suffix>``: the prefix is one of ``transformer.``, ``base_model.model.``,
``diffusion_model.``, ``model.diffusion_model.`` or none (kohya files use ``lora_unet_`` and write the module's dots
as underscores); the module is a BFL name (``double_blocks.0.img_attn.qkv``) or a diffusers name
(``transformer_blocks.0.attn.to_q``); the suffix says which tensor it is (``.lora_A[.default].weight`` or
``.lora_down.weight`` for ``down``, ``.lora_B...``/``.lora_up...`` for ``up``, ``.alpha``). Each module name resolves
to a :class:`Target`: a module path of our DiT ``Flux2`` (BFL names), plus the slot of a split q/k/v projection and
whether diffusers' (scale, shift) order of ``norm_out.linear`` must be swapped. The detectors here decide which
layout a file uses; :mod:`diffstudio_flux2.lora_formats` reads and writes the tensors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from diffstudio.lora import LoraError, LoraFormatError

from diffstudio_flux2.convert import _DIT_DOUBLE, _DIT_DOUBLE_FUSED, _DIT_SINGLE, _DIT_TOP, _SWAPPED

__all__ = [
    "BFL",
    "DIFFUSERS",
    "KOHYA",
    "LoraError",
    "LoraFormatError",
    "Naming",
    "Role",
    "Target",
    "bfl_target",
    "detect_bfl",
    "detect_diffusers",
    "detect_kohya",
    "diffusers_modules",
    "diffusers_target",
    "kohya_target",
    "module_kind",
    "prefixed_target",
    "split_key",
]

Role = Literal["down", "up", "alpha"]
Naming = Literal["bfl", "diffusers"]

DIFFUSERS, BFL, KOHYA = "flux2/diffusers", "flux2/bfl", "flux2/kohya"


# --- module names


def _is_linear(bfl_inner: str) -> bool:
    return not bfl_inner.rsplit(".", 1)[-1].endswith("_norm")  # QK-norm gains carry no LoRA


_TOP: dict[str, str] = dict(_DIT_TOP)  # BFL -> diffusers; every entry is a Linear
_DOUBLE = {bfl: diff for bfl, diff in _DIT_DOUBLE.items() if _is_linear(bfl)}
_SINGLE = {bfl: diff for bfl, diff in _DIT_SINGLE.items() if _is_linear(bfl)}
_FUSED: dict[str, tuple[str, ...]] = dict(_DIT_DOUBLE_FUSED)
_TOP_FROM_DIFFUSERS = {diff: bfl for bfl, diff in _TOP.items()}
_DOUBLE_FROM_DIFFUSERS = {diff: bfl for bfl, diff in _DOUBLE.items()}
_SINGLE_FROM_DIFFUSERS = {diff: bfl for bfl, diff in _SINGLE.items()}
_FUSED_PART = {diff: (bfl, slot) for bfl, parts in _FUSED.items() for slot, diff in enumerate(parts)}
_BLOCK = re.compile(r"^(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_KOHYA_BLOCK = re.compile(r"^(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)_(\d+)_(.+)$")
_INNER_NAMES: dict[str, list[str]] = {
    "double_blocks": [*_DOUBLE, *_FUSED],
    "single_blocks": list(_SINGLE),
    "transformer_blocks": [*_DOUBLE.values(), *_FUSED_PART],
    "single_transformer_blocks": list(_SINGLE.values()),
}
_PREFIXES = (
    "base_model.model.transformer.",
    "base_model.model.",
    "model.diffusion_model.",
    "diffusion_model.",
    "transformer.",
    "",
)
_ROLE_SUFFIXES: tuple[tuple[str, Role], ...] = (
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".alpha", "alpha"),
)


@dataclass(frozen=True)
class Target:
    """Where a file's LoRA module lands in our DiT.

    Attributes:
        path: Module path of the ``DeltaLinear`` (canonical key), e.g. ``double_blocks.0.img_attn.qkv``.
        slot: For one part of a fused projection, its index (q 0, k 1, v 2); None otherwise.
        swap: The file's ``up`` rows are in diffusers' (scale, shift) order and must be swapped.
    """

    path: str
    slot: int | None = None
    swap: bool = False


def bfl_target(name: str) -> Target | None:
    """Resolve a BFL module name (``double_blocks.0.img_attn.qkv``) to its target, or None."""
    if name in _TOP:
        return Target(name)
    match = _BLOCK.match(name)
    if match is None:
        return None
    kind, _, inner = match.groups()
    if (kind == "double_blocks" and (inner in _DOUBLE or inner in _FUSED)) or (
        kind == "single_blocks" and inner in _SINGLE
    ):
        return Target(name)
    return None


def diffusers_target(name: str) -> Target | None:
    """Resolve a diffusers module name (``transformer_blocks.0.attn.to_k``) to its target, or None."""
    if name in _TOP_FROM_DIFFUSERS:
        bfl = _TOP_FROM_DIFFUSERS[name]
        return Target(bfl, swap=bfl == _SWAPPED)
    match = _BLOCK.match(name)
    if match is None:
        return None
    kind, index, inner = match.groups()
    if kind == "transformer_blocks" and inner in _DOUBLE_FROM_DIFFUSERS:
        return Target(f"double_blocks.{index}.{_DOUBLE_FROM_DIFFUSERS[inner]}")
    if kind == "transformer_blocks" and inner in _FUSED_PART:
        fused, slot = _FUSED_PART[inner]
        return Target(f"double_blocks.{index}.{fused}", slot)
    if kind == "single_transformer_blocks" and inner in _SINGLE_FROM_DIFFUSERS:
        return Target(f"single_blocks.{index}.{_SINGLE_FROM_DIFFUSERS[inner]}")
    return None


def diffusers_modules(path: str) -> list[tuple[str, int | None, bool]]:
    """Our module ``path`` -> ``(diffusers name, slot, swap)`` per diffusers module (three for a fused q/k/v).

    Raises:
        LoraFormatError: ``path`` is not a LoRA-capable layer of the FLUX.2 DiT.
    """
    if bfl_target(path) is None:
        raise LoraFormatError(f"{path!r} is not a LoRA-capable layer of the FLUX.2 DiT")
    if path in _TOP:
        return [(_TOP[path], None, path == _SWAPPED)]
    match = _BLOCK.match(path)
    assert match is not None
    kind, index, inner = match.groups()
    block = "transformer_blocks" if kind == "double_blocks" else "single_transformer_blocks"
    if inner in _FUSED:
        return [(f"{block}.{index}.{name}", slot, False) for slot, name in enumerate(_FUSED[inner])]
    table = _DOUBLE if kind == "double_blocks" else _SINGLE
    return [(f"{block}.{index}.{table[inner]}", None, False)]


def _kohya_module(under: str) -> str | None:
    """``double_blocks_0_img_attn_qkv`` -> ``double_blocks.0.img_attn.qkv`` (BFL or diffusers names)."""
    match = _KOHYA_BLOCK.match(under)
    if match is not None:
        kind, index, inner = match.groups()
        found = [name for name in _INNER_NAMES[kind] if name.replace(".", "_") == inner]
        return f"{kind}.{index}.{found[0]}" if len(found) == 1 else None
    found = [name for name in (*_TOP, *_TOP_FROM_DIFFUSERS) if name.replace(".", "_") == under]
    return found[0] if len(found) == 1 else None


def kohya_target(module: str) -> Target | None:
    """Resolve a kohya module name (``lora_unet_double_blocks_0_img_attn_qkv``) to its target, or None."""
    if not module.startswith("lora_unet_"):
        return None
    dotted = _kohya_module(module.removeprefix("lora_unet_"))
    if dotted is None:
        return None
    return bfl_target(dotted) or diffusers_target(dotted)


def split_key(key: str) -> tuple[str, Role] | None:
    """``<module>.lora_A[.default].weight`` -> ``(module, "down")``; None for keys that are not LoRA tensors."""
    for suffix, role in _ROLE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def prefixed_target(module: str, naming: Naming) -> tuple[str, Target] | None:
    """Strip one known prefix so that the rest is a known module name; return (name, target) or None."""
    resolve = bfl_target if naming == "bfl" else diffusers_target
    for prefix in _PREFIXES:
        if module.startswith(prefix):
            target = resolve(module[len(prefix) :])
            if target is not None:
                return module[len(prefix) :], target
    return None


def module_kind(path: str) -> str:
    """``double_blocks.3.img_attn.qkv`` -> ``double_blocks.*.img_attn.qkv`` (for reports)."""
    return re.sub(r"^(double_blocks|single_blocks)\.\d+\.", r"\1.*.", path)


# --- detection


def _has_kohya(keys: Iterable[str]) -> bool:
    return any(key.startswith("lora_unet_") and split_key(key) is not None for key in keys)


def _has_naming(keys: Sequence[str], naming: Naming) -> bool:
    if _has_kohya(keys):
        return False
    for key in keys:
        parts = split_key(key)
        if parts is not None and parts[1] != "alpha" and prefixed_target(parts[0], naming) is not None:
            return True
    return False


def detect_diffusers(keys: Sequence[str]) -> bool:
    """True when some LoRA key names a diffusers ``Flux2Transformer2DModel`` layer (not kohya-style)."""
    return _has_naming(keys, "diffusers")


def detect_bfl(keys: Sequence[str]) -> bool:
    """True when some LoRA key names a BFL FLUX.2 layer (not kohya-style)."""
    return _has_naming(keys, "bfl")


def detect_kohya(keys: Sequence[str]) -> bool:
    """True when some key is a kohya ``lora_unet_*`` LoRA tensor."""
    return _has_kohya(keys)
