"""Core's fallback answers for the decision hooks (``trylast``): plugins that know better win."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from diffstudio._markers import hookimpl
from diffstudio.errors import CacheMergeError
from diffstudio.types import MemoryBudget, PipelineLike, VramStrategy


class ResidentStrategy:
    """Everything on the computation device, for the whole run: the no-offload default.

    Args:
        device: The computation device string.
    """

    name = "resident"

    def __init__(self, device: str) -> None:
        self.device = device

    def apply(self, module: Any) -> Any:
        """Move ``module`` to the computation device (dtypes were chosen by the family at load time)."""
        to = getattr(module, "to", None)
        if to is not None:
            return to(self.device)
        return module

    def onload(self) -> None:
        """Nothing to do: the weights never leave the device."""

    def offload(self) -> None:
        """Nothing to do: the weights never leave the device."""


@hookimpl(trylast=True)
def vram_policy(model: Any, component: str, budget: MemoryBudget, pipeline: PipelineLike) -> VramStrategy:
    """Keep every weight resident on the computation device."""
    return ResidentStrategy(budget.computation_device)


def _same(a: Any, b: Any) -> bool:
    try:
        import torch

        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return (
                isinstance(a, torch.Tensor)
                and isinstance(b, torch.Tensor)
                and a.shape == b.shape
                and bool(torch.equal(a, b))
            )
    except ImportError:  # pragma: no cover - torch is a core dependency
        pass
    return bool(a == b)


@hookimpl(trylast=True)
def template_cache_merge(key: str, values: Sequence[Any], pipeline: PipelineLike) -> Any:
    """Accept identical values; reject anything else for a key no medium plugin owns."""
    first = values[0]
    if all(_same(first, other) for other in values[1:]):
        return first
    raise CacheMergeError(
        f"{len(values)} templates produced different values for the pipeline input {key!r}, and no installed "
        f"medium plugin knows how to merge {key!r}. Use one template for this input, or install the medium "
        f"plugin that owns it (see `diffstudio plugins`)."
    )
