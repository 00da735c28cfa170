"""The template media: value types with shape validation, and their merge rules.

A template's cache is a dict keyed by base-pipeline inputs. Three keys carry the media this SDK defines; the
medium plugins (``diffstudio-medium-kv``, ``-lora``, ``-residual``) merge them with the functions below and
contribute the units that feed them to a family's extension points.

========================  =====================================================================================
key                       value
========================  =====================================================================================
``kv_cache``              ``{"double_i" | "single_i": (K, V)}``, K and V each ``(B or 1, L_kv, H, Dh)`` in the
                          block's post-norm, post-RoPE key space. Merged by concatenating along tokens (dim 1).
``extra_text_embedding``  ``(B or 1, L_extra, context width)`` extra text tokens; merged along tokens (dim 1).
``lora``                  ``{module path: LoraWeights(down (r, in), up (out, r), alpha)}`` (the canonical form of
                          :mod:`diffstudio.lora`), or flat tensors ``{"<path>.lora_A.weight": (r, in),
                          "<path>.lora_B.weight": (out, r)[, "<path>.alpha": ()]}``. Merged by concatenating
                          along rank (down on dim 0, up on dim 1, each up pre-scaled by its alpha / rank), which
                          is exactly the sum of the LoRAs.
``block_residuals``       ``{"double_i" | "single_i": R}``, R ``(B or 1, D, h, w)`` at the latent grid (``h x w``
                          latent tokens, ``D`` the DiT width), added to the image tokens after that block.
                          Merged by summing; different grids are an error.
========================  =====================================================================================

Nothing here detaches or copies more than needed, so gradients flow through every merge (template training).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from diffstudio.errors import CacheFormatError, CacheMergeError

if TYPE_CHECKING:
    from diffstudio.lora import LoraWeights
    from torch import Tensor

KV_CACHE = "kv_cache"
EXTRA_TEXT = "extra_text_embedding"
LORA = "lora"
RESIDUALS = "block_residuals"

BLOCK_NAME = re.compile(r"^(double|single)_\d+$")

KVCache = dict[str, tuple["Tensor", "Tensor"]]
LoraCache = dict[str, "LoraWeights"]
ResidualCache = dict[str, "Tensor"]

__all__ = [
    "BLOCK_NAME",
    "EXTRA_TEXT",
    "KV_CACHE",
    "LORA",
    "RESIDUALS",
    "KVCache",
    "LoraCache",
    "ResidualCache",
    "check_kv_cache",
    "check_lora_cache",
    "check_residuals",
    "common_batch",
    "merge_extra_text",
    "merge_kv_caches",
    "merge_lora_caches",
    "merge_residuals",
    "residual_tokens",
]


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _block_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not BLOCK_NAME.match(name):
        raise CacheFormatError(f"{where}: block name {name!r} is not 'double_<i>' or 'single_<i>'")
    return name


def common_batch(sizes: Sequence[int], where: str) -> int:
    """The batch size several tensors broadcast to: all equal, or 1 and one other value."""
    others = {s for s in sizes if s != 1}
    if len(others) > 1:
        raise CacheMergeError(f"{where}: batch sizes {sorted(set(sizes))} cannot be combined (use 1 or one size)")
    return others.pop() if others else 1


# ----------------------------------------------------------------------------------------------------------
# KV cache and extra text tokens
# ----------------------------------------------------------------------------------------------------------


def check_kv_cache(value: Any, where: str = KV_CACHE) -> KVCache:
    """Validate a KV cache: block names, ``(K, V)`` pairs of equal 4-D shape ``(B, L_kv, H, Dh)``."""
    if not isinstance(value, Mapping):
        raise CacheFormatError(f"{where} must be a dict {{'double_0': (K, V), ...}}, got {type(value).__name__}")
    out: KVCache = {}
    for name, pair in value.items():
        _block_name(name, where)
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(_is_tensor(t) for t in pair):
            raise CacheFormatError(f"{where}[{name!r}] must be a (K, V) pair of tensors")
        k, v = pair
        if k.ndim != 4 or k.shape != v.shape:
            raise CacheFormatError(
                f"{where}[{name!r}]: K {tuple(k.shape)} and V {tuple(v.shape)} must both be (B, L_kv, heads, head_dim)"
            )
        out[name] = (k, v)
    return out


def merge_kv_caches(caches: Sequence[Any], where: str = KV_CACHE) -> KVCache:
    """Concatenate KV caches along tokens, block by block (batch-1 entries broadcast).

    Args:
        caches: Two or more KV caches, in template order (their tokens keep that order).
        where: The key, for messages.

    Returns:
        ``{block: (K, V)}`` with ``L_kv`` the sum over the caches that have the block.

    Raises:
        CacheFormatError: A cache is malformed. CacheMergeError: heads/head dims or batch sizes differ.
    """
    import torch

    checked = [check_kv_cache(c, f"{where} of template {i}") for i, c in enumerate(caches)]
    merged: KVCache = {}
    for name in dict.fromkeys(n for c in checked for n in c):
        pairs = [c[name] for c in checked if name in c]
        layouts = {tuple(k.shape[2:]) for k, _ in pairs}
        if len(layouts) > 1:
            raise CacheMergeError(
                f"{where}[{name!r}]: (heads, head_dim) differ between templates {sorted(layouts)}; the caches were "
                f"made for different models"
            )
        batch = common_batch([k.shape[0] for k, _ in pairs], f"{where}[{name!r}]")
        ks = [k.expand(batch, -1, -1, -1) for k, _ in pairs]
        vs = [v.expand(batch, -1, -1, -1).to(ks[0].dtype) for _, v in pairs]
        merged[name] = (torch.cat([k.to(ks[0].dtype) for k in ks], dim=1), torch.cat(vs, dim=1))
    return merged


def merge_extra_text(values: Sequence[Any], where: str = EXTRA_TEXT) -> Tensor:
    """Concatenate extra text tokens ``(B or 1, L, width)`` along tokens."""
    import torch

    for i, value in enumerate(values):
        if not _is_tensor(value) or value.ndim != 3:
            raise CacheFormatError(f"{where} of template {i} must be a (B, L, width) tensor")
    widths = {int(v.shape[2]) for v in values}
    if len(widths) > 1:
        raise CacheMergeError(f"{where}: token widths differ between templates {sorted(widths)}")
    batch = common_batch([int(v.shape[0]) for v in values], where)
    return torch.cat([v.expand(batch, -1, -1).to(values[0].dtype) for v in values], dim=1)


# ----------------------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------------------

_ALIASES = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}
_FLAT = re.compile(r"^(?P<path>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_down\.weight|lora_up\.weight|alpha)$")


def check_lora_cache(value: Any, where: str = LORA) -> LoraCache:
    """Validate a LoRA cache and return it in canonical form ``{module path: LoraWeights}`` (tensors not copied).

    Accepts the canonical form or flat tensors named ``<path>.lora_A.weight`` / ``<path>.lora_B.weight`` (also
    ``lora_down`` / ``lora_up``) with an optional scalar ``<path>.alpha``.
    """
    from diffstudio.lora import LoraWeights

    if not isinstance(value, Mapping):
        raise CacheFormatError(f"{where} must be a dict of LoRA tensors, got {type(value).__name__}")
    out: LoraCache = {}
    flat: dict[str, dict[str, Any]] = {}
    for key, item in value.items():
        if isinstance(item, LoraWeights):
            out[str(key)] = item
            continue
        match = _FLAT.match(str(key)) if _is_tensor(item) else None
        if match is None:
            raise CacheFormatError(
                f"{where}[{key!r}]: expected LoraWeights or a tensor named '<module>.lora_A.weight' / "
                f"'<module>.lora_B.weight' / '<module>.alpha'"
            )
        part = _ALIASES.get(match["part"], match["part"])
        flat.setdefault(match["path"], {})[part] = item
    for path, parts in flat.items():
        if "lora_A.weight" not in parts or "lora_B.weight" not in parts:
            raise CacheFormatError(f"{where}: module {path!r} needs both lora_A.weight and lora_B.weight")
        alpha = parts.get("alpha")
        try:
            out[path] = LoraWeights(parts["lora_A.weight"], parts["lora_B.weight"],
                                    None if alpha is None else float(alpha))  # fmt: skip
        except ValueError as exc:
            raise CacheFormatError(f"{where}[{path!r}]: {exc}") from exc
    return out


def merge_lora_caches(caches: Sequence[Any], where: str = LORA) -> LoraCache:
    """Concatenate LoRAs along rank, which equals summing their updates ``sum_i factor_i * up_i @ down_i``.

    Each ``up`` is pre-scaled by its ``alpha / rank`` so the merged pair has ``alpha=None`` (factor 1). Modules
    only some LoRAs touch keep those LoRAs' pairs.

    Raises:
        CacheMergeError: Two LoRAs disagree on a module's in/out features.
    """
    import torch
    from diffstudio.lora import LoraWeights

    checked = [check_lora_cache(c, f"{where} of template {i}") for i, c in enumerate(caches)]
    merged: LoraCache = {}
    for path in dict.fromkeys(p for c in checked for p in c):
        pairs = [c[path] for c in checked if path in c]
        shapes = {(int(w.down.shape[1]), int(w.up.shape[0])) for w in pairs}
        if len(shapes) > 1:
            raise CacheMergeError(f"{where}[{path!r}]: the LoRAs map different features (in, out) {sorted(shapes)}")
        dtype = pairs[0].down.dtype
        down = torch.cat([w.down.to(dtype) for w in pairs], dim=0)
        up = torch.cat([(w.up * w.factor).to(dtype) for w in pairs], dim=1)
        merged[path] = LoraWeights(down, up, None)
    return merged


# ----------------------------------------------------------------------------------------------------------
# residuals
# ----------------------------------------------------------------------------------------------------------


def check_residuals(value: Any, where: str = RESIDUALS) -> ResidualCache:
    """Validate block residuals: block names, 4-D ``(B, D, h, w)`` tensors."""
    if not isinstance(value, Mapping):
        raise CacheFormatError(f"{where} must be a dict {{'double_0': (B, D, h, w), ...}}, got {type(value).__name__}")
    out: ResidualCache = {}
    for name, tensor in value.items():
        _block_name(name, where)
        if not _is_tensor(tensor) or tensor.ndim != 4:
            shape = tuple(tensor.shape) if _is_tensor(tensor) else type(tensor).__name__
            raise CacheFormatError(f"{where}[{name!r}] must be a (B, D, h, w) tensor at the latent grid, got {shape}")
        out[name] = tensor
    return out


def merge_residuals(caches: Sequence[Any], where: str = RESIDUALS) -> ResidualCache:
    """Sum residuals block by block.

    Raises:
        CacheMergeError: Two residuals of a block have different widths or latent grids (templates run at
            different image sizes), or incompatible batch sizes.
    """
    checked = [check_residuals(c, f"{where} of template {i}") for i, c in enumerate(caches)]
    merged: ResidualCache = {}
    for name in dict.fromkeys(n for c in checked for n in c):
        tensors = [c[name] for c in checked if name in c]
        grids = {tuple(int(s) for s in t.shape[1:]) for t in tensors}
        if len(grids) > 1:
            shown = ", ".join(f"D={d} at {h}x{w}" for d, h, w in sorted(grids))
            raise CacheMergeError(
                f"{where}[{name!r}]: residuals of different resolutions cannot be summed ({shown} latent tokens). "
                f"Give every residual template the same height and width as the image being generated."
            )
        common_batch([int(t.shape[0]) for t in tensors], f"{where}[{name!r}]")
        total = tensors[0]
        for tensor in tensors[1:]:
            total = total + tensor.to(total.dtype)
        merged[name] = total
    return merged


def residual_tokens(residual: Tensor) -> Tensor:
    """``(B, D, h, w)`` residual at the latent grid -> ``(B, h*w, D)`` tokens in row-major order."""
    return residual.flatten(2).transpose(1, 2)
