"""Finding NaN and Inf values in tensors (a damaged checkpoint or LoRA turns every image into NaN).

Checking is a full pass over the data (about 1 s per 4 GB of float32 on one core), so callers decide when it is
worth it: LoRA files are checked whole when read (they are small); a pipeline checks its latents instead of its
weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["is_finite", "nonfinite_tensors"]


def is_finite(tensor: Tensor) -> bool:
    """True when ``tensor`` holds no NaN or Inf (integer and bool tensors always; float8 kinds are widened)."""
    import torch

    if not tensor.is_floating_point() and not tensor.is_complex():
        return True
    if tensor.element_size() == 1:  # isfinite is not implemented for every float8 kind
        tensor = tensor.float()
    return bool(torch.isfinite(tensor).all())


def nonfinite_tensors(tensors: Mapping[str, Tensor], names: Iterable[str] | None = None) -> list[str]:
    """The names (of ``names``, default all) whose tensors hold NaN or Inf, in order."""
    return [name for name in (tensors if names is None else names) if not is_finite(tensors[name])]
