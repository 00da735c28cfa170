"""The KV-cache check unit."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffstudio.errors import CacheFormatError
from diffstudio.pipeline.base import BasePipeline
from diffstudio.pipeline.units import InputParam, PipelineUnit
from diffstudio_template_sdk.media import check_kv_cache


class CheckKVCache(PipelineUnit):
    """Reject a KV cache that does not fit the loaded DiT, with a message naming the block and the shapes."""

    name = "medium_kv_check"
    description = "Checks kv_cache against the DiT: known block names, (B|1, L_kv, heads, head_dim) per block."
    per_branch = True
    inputs = (InputParam("kv_cache", "per-block (K, V) appended after RoPE, each (1|B, L_kv, H, Dh)", per_branch=True),)

    def process(self, pipe: BasePipeline, **inputs: Any) -> Mapping[str, Any]:
        cache = inputs["kv_cache"]
        if cache is None:
            return {}
        cache = check_kv_cache(cache)
        if not pipe.has("dit"):  # reads the DiT's metadata only: no onloading
            return {}
        dit = pipe.dit
        names = set(getattr(dit, "block_names", ()))
        heads = int(getattr(dit, "num_heads", 0))
        head_dim = int(getattr(dit, "hidden_size", 0)) // max(heads, 1)
        for name, (k, _) in cache.items():
            if names and name not in names:
                raise CacheFormatError(
                    f"kv_cache names the block {name!r}, which this DiT does not have (it has "
                    f"{len([n for n in names if n.startswith('double')])} double and "
                    f"{len([n for n in names if n.startswith('single')])} single blocks); the template was made "
                    f"for another model"
                )
            if heads and tuple(k.shape[2:]) != (heads, head_dim):
                raise CacheFormatError(
                    f"kv_cache[{name!r}] has (heads, head_dim) = {tuple(k.shape[2:])}, the DiT uses "
                    f"({heads}, {head_dim}); the template was made for another model"
                )
        return {}
