"""``VramReport``: what one model's memory strategy placed where, as plain data."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


def format_bytes(nbytes: int | float) -> str:
    """``1536 -> '1.5 KiB'`` (binary units, one decimal)."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover - loop always returns


@dataclass(frozen=True)
class VramReport:
    """One model's placement (``pipe.vram_report()[component]`` is ``report.as_dict()``).

    Attributes:
        component: Pipeline slot.
        strategy: Strategy name (``"layerwise"``, ``"resident"``, or a plugin's).
        onloaded: Whether the model's stage is active now.
        units: Streaming units (repeated blocks, plus leaves outside them).
        leaves: Managed layers.
        resident_units: Units resident in the current (or last) stage's plan; all of them before any plan.
        streamed_units: Units streamed every call in that plan.
        offload: ``device/dtype(s)`` of the stores at rest.
        onload: ``device/dtype(s)`` in the onload state.
        preparing: ``device/dtype(s)`` in the preparing state.
        computation: ``device/dtype`` of computation.
        offload_bytes: Bytes of the stores at rest (memory-mapped for ``"disk"``).
        resident_bytes: Bytes of the resident units in that plan.
        pinned_bytes: Bytes of tensors outside the leaves (moved with the model as a whole).
        high_precision_tensors: Tensors kept in the computation dtype by ``keep_in_high_precision``.
        vram_limit_bytes: The pipeline's budget (None: no limit).
        prefetch_depth: Units fetched ahead (0 off CUDA).
        fetches: Unit fetches since the stage started.
        ledger: The pipeline ledger of the computation device (``DeviceLedger.as_dict()``).
    """

    component: str
    strategy: str
    onloaded: bool = False
    units: int = 0
    leaves: int = 0
    resident_units: int = 0
    streamed_units: int = 0
    offload: str = ""
    onload: str = ""
    preparing: str = ""
    computation: str = ""
    offload_bytes: int = 0
    resident_bytes: int = 0
    pinned_bytes: int = 0
    high_precision_tensors: int = 0
    vram_limit_bytes: int | None = None
    prefetch_depth: int = 0
    fetches: int = 0
    ledger: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of every field."""
        return asdict(self)
