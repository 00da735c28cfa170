"""Per-call extension hooks: moved to :mod:`diffstudio.dit.extensions` (the DiT call contract, owned by no family).

The names stay importable from here for one release.
"""

from __future__ import annotations

from diffstudio.dit.extensions import (
    BatchedResidual,
    CallHook,
    DitCall,
    SummedResidual,
    merge_extensions,
    run_call_hooks,
)

__all__ = ["BatchedResidual", "CallHook", "DitCall", "SummedResidual", "merge_extensions", "run_call_hooks"]
