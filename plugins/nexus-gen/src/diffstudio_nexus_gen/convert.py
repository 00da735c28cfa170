"""DiffSynth's legacy FLUX.1 DiT names (what the Nexus-Gen decoder files hold) <-> BFL names, and file splitting.

A Nexus-Gen decoder file (``generation_decoder.bin``, ``edit_decoder.bin``) holds a whole FLUX.1 DiT under
``pipe.dit.`` in DiffSynth-Studio's 1.x module names (``blocks.N.attn.a_to_qkv``, ``single_blocks.N.to_qkv_mlp``,
``final_norm_out.linear``, ...) beside its adapter (``adapter.*``, generation) or its embedding merger
(``embedding_merger.*``, editing). The DiT's final adaptive norm is stored with its halves in diffusers' (scale,
shift) order; BFL's ``final_layer.adaLN_modulation.1`` is (shift, scale), so the halves are exchanged.

Converters are pure (a new dict; the input is never modified) and exact (renames and one row exchange), so
``convert_bfl_to_legacy_dit(convert_legacy_to_bfl_dit(sd)) == sd`` tensor for tensor.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from diffstudio.errors import CheckpointError
from diffstudio.loading.convert import swap_halves
from torch import Tensor

StateDict = Mapping[str, Tensor]

DIT_PREFIX = "pipe.dit."
"""Where a decoder file keeps its DiT."""
ADAPTER_PREFIX = "adapter."
"""The generation decoder's adapter (its keys keep this prefix: ``adapter.0.weight``)."""
MERGER_PREFIX = "embedding_merger."
"""The editing decoder's embedding merger."""


class LegacyDitKeyError(CheckpointError):
    """A key of a Nexus-Gen decoder's DiT is not part of the FLUX.1 DiT in DiffSynth's legacy names."""


LEGACY_TOP = {  # BFL module -> DiffSynth legacy module
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_embedder.timestep_embedder.0",
    "time_in.out_layer": "time_embedder.timestep_embedder.2",
    "guidance_in.in_layer": "guidance_embedder.timestep_embedder.0",
    "guidance_in.out_layer": "guidance_embedder.timestep_embedder.2",
    "vector_in.in_layer": "pooled_text_embedder.0",
    "vector_in.out_layer": "pooled_text_embedder.2",
    "final_layer.linear": "final_proj_out",
    "final_layer.adaLN_modulation.1": "final_norm_out.linear",
}
LEGACY_DOUBLE = {  # inside double_blocks.N (BFL) -> inside blocks.N (legacy); full parameter names
    "img_mod.lin": "norm1_a.linear",
    "txt_mod.lin": "norm1_b.linear",
    "img_attn.qkv": "attn.a_to_qkv",
    "txt_attn.qkv": "attn.b_to_qkv",
    "img_attn.proj": "attn.a_to_out",
    "txt_attn.proj": "attn.b_to_out",
    "img_attn.norm.query_norm.scale": "attn.norm_q_a.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k_a.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_q_b.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_k_b.weight",
    "img_mlp.0": "ff_a.0",
    "img_mlp.2": "ff_a.2",
    "txt_mlp.0": "ff_b.0",
    "txt_mlp.2": "ff_b.2",
}
LEGACY_SINGLE = {  # inside single_blocks.N, both sides
    "linear1": "to_qkv_mlp",
    "linear2": "proj_out",
    "modulation.lin": "norm.linear",
    "norm.query_norm.scale": "norm_q_a.weight",
    "norm.key_norm.scale": "norm_k_a.weight",
}
SWAPPED = "final_layer.adaLN_modulation.1"
"""The BFL module whose two halves the legacy files store exchanged."""

_BLOCK = re.compile(r"^(double_blocks|single_blocks|blocks)\.(\d+)\.(.+)$")
_BFL_BLOCK = {"double_blocks": ("blocks", LEGACY_DOUBLE), "single_blocks": ("single_blocks", LEGACY_SINGLE)}


def _rename(name: str, table: Mapping[str, str]) -> str | None:
    """``name`` through a module table whose entries are modules (+ ``.weight``/``.bias``) or full names."""
    if name in table:
        return table[name]
    module, _, param = name.rpartition(".")
    if param in ("weight", "bias") and module in table and not table[module].endswith((".weight", ".bias")):
        return f"{table[module]}.{param}"
    return None


def _inverse(table: Mapping[str, str]) -> dict[str, str]:
    return {legacy: bfl for bfl, legacy in table.items()}


def _fail(what: str, keys: list[str]) -> LegacyDitKeyError:
    shown = ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")
    return LegacyDitKeyError(f"{what}: {shown}")


def _rename_all(
    sd: StateDict, rename: Callable[[str], str | None], *, bfl_of: Callable[[str, str], str], what: str
) -> dict[str, Tensor]:
    """Every key through ``rename``, the final-norm halves swapped.

    A tensor is swapped where its BFL name (``bfl_of(key, renamed)``) is one of :data:`SWAPPED`'s.

    Raises:
        LegacyDitKeyError: Keys ``rename`` maps to None (listed, after ``what``).
    """
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        renamed = rename(key)
        if renamed is None:
            unknown.append(key)
            continue
        out[renamed] = swap_halves(value) if bfl_of(key, renamed).startswith(SWAPPED + ".") else value
    if unknown:
        raise _fail(what, unknown)
    return out


def convert_legacy_to_bfl_dit(sd: StateDict) -> dict[str, Tensor]:
    """DiffSynth legacy FLUX.1 DiT names (``pipe.dit.`` already removed) -> BFL names, final-norm halves swapped.

    Args:
        sd: ``blocks.N.*``, ``single_blocks.N.*`` and top-level legacy names (a ``pipe.dit.`` prefix is stripped).

    Returns:
        A new state dict that :class:`diffstudio_flux1.model.Flux` loads by identity.

    Raises:
        LegacyDitKeyError: Keys that are not part of the legacy FLUX.1 DiT (listed).
    """
    top, double, single = _inverse(LEGACY_TOP), _inverse(LEGACY_DOUBLE), _inverse(LEGACY_SINGLE)

    def to_bfl(key: str) -> str | None:
        name = key.removeprefix(DIT_PREFIX)
        match = _BLOCK.match(name)
        if match is None or match.group(1) == "double_blocks":
            return _rename(name, top)
        kind = "double_blocks" if match.group(1) == "blocks" else "single_blocks"
        inner = _rename(match.group(3), double if kind == "double_blocks" else single)
        return None if inner is None else f"{kind}.{match.group(2)}.{inner}"

    return _rename_all(sd, to_bfl, bfl_of=lambda key, renamed: renamed,
                       what="not part of a FLUX.1 DiT in DiffSynth's legacy names (Nexus-Gen decoder)")  # fmt: skip


def convert_bfl_to_legacy_dit(sd: StateDict) -> dict[str, Tensor]:
    """BFL FLUX.1 DiT names -> DiffSynth legacy names as the decoder files store them (inverse of the above).

    Raises:
        LegacyDitKeyError: Keys that are not part of the BFL FLUX.1 DiT (listed).
    """

    def to_legacy(key: str) -> str | None:
        match = _BLOCK.match(key)
        if match is None or match.group(1) not in _BFL_BLOCK:
            return _rename(key, LEGACY_TOP)
        legacy_kind, table = _BFL_BLOCK[match.group(1)]
        inner = _rename(match.group(3), table)
        return None if inner is None else f"{legacy_kind}.{match.group(2)}.{inner}"

    return _rename_all(sd, to_legacy, bfl_of=lambda key, renamed: key, what="not part of a BFL FLUX.1 DiT")


def split_decoder(sd: StateDict) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One decoder file -> ``(DiT in BFL names, adapter or merger tensors with their own prefix)``.

    Raises:
        LegacyDitKeyError: A key belongs to none of the parts, or a DiT key is not a legacy FLUX.1 name.
    """
    dit = {k: v for k, v in sd.items() if k.startswith(DIT_PREFIX)}
    head = {k: v for k, v in sd.items() if k.startswith((ADAPTER_PREFIX, MERGER_PREFIX))}
    other = [k for k in sd if k not in dit and k not in head]
    if other:
        raise _fail(
            f"a Nexus-Gen decoder holds {DIT_PREFIX}*, {ADAPTER_PREFIX}* or {MERGER_PREFIX}* tensors, not", other
        )
    return convert_legacy_to_bfl_dit(dit), head


def decoder_kind(keys: list[str] | set[str]) -> str | None:
    """``"generation"`` (adapter), ``"editing"`` (merger) or None for a file that is not a decoder file."""
    names = list(keys)
    if not any(k.startswith(DIT_PREFIX) for k in names):
        return None
    if any(k.startswith(ADAPTER_PREFIX) for k in names):
        return "generation"
    if any(k.startswith(MERGER_PREFIX) for k in names):
        return "editing"
    return None


def head_kind(keys: list[str] | set[str]) -> str | None:
    """The same for a file holding only the adapter or the merger (the second part of a converted decoder)."""
    names = list(keys)
    if not names or any(k.startswith(DIT_PREFIX) for k in names):
        return None
    if all(k.startswith(ADAPTER_PREFIX) for k in names):
        return "generation"
    if all(k.startswith(MERGER_PREFIX) for k in names):
        return "editing"
    return None
