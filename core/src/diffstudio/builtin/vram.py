"""Core's builtin ``vram_policy``: the seed's offload / onload / preparing / computation semantics, per layer.

It answers for every model whose ``ModelConfig`` sets a memory field (``budget.managed``) and declines the
others, which the ``trylast`` fallback keeps resident (not wrapped at all). Third-party plugins registered
after core answer first, so a plugin that returns its own strategy for some models replaces this policy for
those models only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from diffstudio._markers import hookimpl
from diffstudio.devices import DISK, is_fp8, parse_device, parse_dtype
from diffstudio.errors import ConfigError
from diffstudio.types import MemoryBudget, VramStrategy

if TYPE_CHECKING:
    from diffstudio.pipeline.base import BasePipeline
    from diffstudio.vram.ledger import DeviceLedger

_STATES = ("offload", "onload", "preparing", "computation")


def check_budget(budget: MemoryBudget) -> None:
    """Validate a budget built by anyone (not only ``ModelConfig``): typed errors that name the field.

    Raises:
        ConfigError: An unknown device or dtype, ``"disk"`` where weights are prepared or computed, a negative
            ``vram_limit``, a negative prefetch depth, or fp8 as the computation dtype.
    """
    for state in _STATES:
        disk_ok = state in ("offload", "onload")
        parse_device(getattr(budget, f"{state}_device"), name=f"{state}_device", allow_disk=disk_ok)
        dtype = getattr(budget, f"{state}_dtype")
        if not (disk_ok and isinstance(dtype, str) and dtype.strip().lower() == DISK):
            parse_dtype(dtype, name=f"{state}_dtype")
    if budget.vram_limit_bytes is not None and budget.vram_limit_bytes < 0:
        raise ConfigError(
            f"vram_limit={budget.vram_limit_bytes / 1024**3:g} GiB is negative; pass a budget >= 0 in GiB, or None "
            f"for no limit"
        )
    if budget.prefetch_depth < 0:
        raise ConfigError(f"vram_prefetch={budget.prefetch_depth} is negative; use 0 (no prefetch) or more")
    if is_fp8(parse_dtype(budget.computation_dtype, name="computation_dtype")):
        raise ConfigError(
            f"computation_dtype={budget.computation_dtype} is not supported: layers compute in bfloat16, "
            f"float16 or float32. For fp8 storage set offload_dtype / onload_dtype / preparing_dtype to "
            f"float8_e4m3fn (or float8_e5m2) and keep computation_dtype=torch.bfloat16."
        )


def normalised(budget: MemoryBudget) -> MemoryBudget:
    """The budget with device strings normalised and dtype names parsed (``"disk"`` kept)."""

    def dtype(state: str) -> Any:
        value = getattr(budget, f"{state}_dtype")
        if isinstance(value, str) and value.strip().lower() == DISK:
            return DISK
        return parse_dtype(value, name=f"{state}_dtype")

    def device(state: str) -> str:
        return parse_device(getattr(budget, f"{state}_device"), name=f"{state}_device", allow_disk=True)

    return MemoryBudget(
        offload_device=device("offload"),
        offload_dtype=dtype("offload"),
        onload_device=device("onload"),
        onload_dtype=dtype("onload"),
        preparing_device=device("preparing"),
        preparing_dtype=dtype("preparing"),
        computation_device=device("computation"),
        computation_dtype=dtype("computation"),
        vram_limit_bytes=budget.vram_limit_bytes,
        managed=budget.managed,
        prefetch_depth=budget.prefetch_depth,
    )


def ledger_for(pipeline: BasePipeline | None, budget: MemoryBudget) -> DeviceLedger:
    """The pipeline's shared ledger of the computation device (a private one without a pipeline)."""
    from diffstudio.vram.ledger import DeviceLedger

    getter = getattr(pipeline, "vram_ledger", None)
    if callable(getter):
        ledger: DeviceLedger = getter(budget.computation_device)
        return ledger
    return DeviceLedger(budget.computation_device, budget.vram_limit_bytes)


@hookimpl
def vram_policy(model: Any, component: str, budget: MemoryBudget, pipeline: BasePipeline) -> VramStrategy | None:
    """Per-layer management for models with memory fields; None (resident fallback) for the others."""
    check_budget(budget)
    if not budget.managed:
        return None
    from torch import nn

    from diffstudio.vram.strategy import LayerwiseStrategy

    if not isinstance(model, nn.Module):
        return None
    clean = normalised(budget)
    return LayerwiseStrategy(component, clean, ledger_for(pipeline, clean))
