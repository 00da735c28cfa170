"""Low-memory execution: the builtin ``vram_policy`` machinery.

* :mod:`~diffstudio.vram.metadata`: what a family declares (``repeated_blocks``, ``memory_leaves``,
  ``keep_in_high_precision``) and how it is read;
* :mod:`~diffstudio.vram.strategy`: :class:`LayerwiseStrategy`, the four weight states per layer, the
  residency plan under ``vram_limit``;
* :mod:`~diffstudio.vram.streaming`: slots and prefetch on a CUDA side stream (synchronous elsewhere);
* :mod:`~diffstudio.vram.ledger`: the pipeline's own budget accounting;
* :mod:`~diffstudio.vram.report`: :class:`VramReport`, the data behind the load summary and
  ``pipe.vram_report()``.

Importing this package imports torch.
"""

from diffstudio.vram.ledger import DeviceLedger
from diffstudio.vram.metadata import LeafSpec, MemoryMetadata, ModelLayout
from diffstudio.vram.report import VramReport, format_bytes
from diffstudio.vram.strategy import LayerwiseStrategy, spread_order

__all__ = [
    "DeviceLedger",
    "LayerwiseStrategy",
    "LeafSpec",
    "MemoryMetadata",
    "ModelLayout",
    "VramReport",
    "format_bytes",
    "spread_order",
]
