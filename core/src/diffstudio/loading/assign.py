"""Building modules on the meta device and assigning (memory-mapped) tensors to them.

The loading recipe of every family::

    model = build_on_meta(lambda: FluxDiT(config))                  # no memory, no random init
    load_state_dict_into(model, checkpoint.state_dict(), dtype=torch.bfloat16, device="cuda")

When no dtype or device conversion is needed, the module's parameters *are* the checkpoint's memory-mapped
tensors (zero copy). Otherwise each tensor is converted once, straight from the map.

Non-persistent buffers (RoPE tables, position ids, ...) are not in checkpoints and stay on meta after
assignment. They are recomputed here: every submodule that defines a ``reset_non_persistent_buffers()``
method has it called, then the optional ``init_non_persistent(module)`` callback runs. Both run inside
``with torch.device(target)`` (``device``, or CPU), so tensor factories in them (``torch.arange``, ...) create
the buffers where the weights are. Anything still on meta afterwards is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, TypeVar

from diffstudio.errors import CheckpointError, StrictLoadError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "MetaTensorsRemainError",
    "WeightDtypeError",
    "build_on_meta",
    "find_meta_tensors",
    "load_state_dict_into",
]

M = TypeVar("M", bound="nn.Module")


class MetaTensorsRemainError(CheckpointError):
    """Parameters or buffers are still on the meta device after loading."""


class WeightDtypeError(CheckpointError):
    """A checkpoint holds integer, bool or complex data where the module has real floating-point weights."""


def build_on_meta(factory: Callable[[], M]) -> M:
    """Construct a module on the meta device: shapes only, no memory and no random initialisation.

    Args:
        factory: Builds the module, e.g. ``lambda: FluxDiT(config)``.

    Returns:
        The module, every parameter and buffer on ``meta``.
    """
    import torch

    with torch.device("meta"):
        return factory()


def find_meta_tensors(module: nn.Module) -> list[str]:
    """Return the names of the parameters and buffers of ``module`` that are on the meta device."""
    names = [name for name, p in module.named_parameters(remove_duplicate=False) if p.is_meta]
    names += [name for name, b in module.named_buffers(remove_duplicate=False) if b.is_meta]
    return names


def _plan(
    expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """Compare ``state_dict`` with the module's own: (missing, unexpected, mismatched shapes)."""
    missing = [name for name in expected if name not in state_dict]
    unexpected = sorted(name for name in state_dict if name not in expected)
    mismatched = [
        f"{name}: checkpoint {list(state_dict[name].shape)} vs model {list(tensor.shape)}"
        for name, tensor in expected.items()
        if name in state_dict and tuple(state_dict[name].shape) != tuple(tensor.shape)
    ]
    return missing, unexpected, mismatched


def _wrong_kinds(expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Tensors whose kind (real floating point vs integer/bool/complex) differs from the module's."""
    wrong = []
    for name, tensor in expected.items():
        given = state_dict.get(name)
        if given is None or not tensor.is_floating_point():
            continue
        if not given.is_floating_point():
            wrong.append(f"{name} ({str(given.dtype).removeprefix('torch.')}, expected floating point)")
    return wrong


def load_state_dict_into(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    init_non_persistent: Callable[[nn.Module], None] | None = None,
    source: str | None = None,
) -> None:
    """Assign ``state_dict`` to ``module`` (built with :func:`build_on_meta` or normally).

    Tensors are assigned, not copied into existing storage: without ``dtype``/``device`` conversion the
    parameters are the given (e.g. memory-mapped) tensors themselves. ``dtype`` converts floating-point
    tensors
    only (integer and bool buffers keep their dtype). Parameters become ``nn.Parameter`` with the
    ``requires_grad`` of the module's original parameter.

    Args:
        module: The module to fill.
        state_dict: Names (as in ``module.state_dict()``) mapped to tensors of the same shapes.
        strict: Missing and unexpected keys are an error. Shape mismatches are always an error.
        dtype: Target dtype of floating-point tensors, or None to keep the checkpoint's.
        device: Target device, or None to keep the tensors where they are (CPU for a checkpoint).
        init_non_persistent: Called with ``module`` after assignment to create non-persistent buffers (after
            any ``reset_non_persistent_buffers()`` methods of submodules), inside ``torch.device(target)``.
        source: The file or folder the tensors come from, named in error messages.

    Raises:
        StrictLoadError: missing/unexpected keys (when strict) or shape mismatches, all listed at once.
        WeightDtypeError: integer, bool or complex tensors for floating-point weights, all listed at once.
        MetaTensorsRemainError: parameters or buffers are still on meta after loading.
    """
    import torch

    expected = module.state_dict(keep_vars=True)
    missing, unexpected, mismatched = _plan(expected, state_dict)
    if mismatched or (strict and (missing or unexpected)):
        raise StrictLoadError(
            type(module).__name__,
            missing if strict else [],
            unexpected if strict else [],
            mismatched,
            source=source,
        )
    wrong = _wrong_kinds(expected, state_dict)
    if wrong:
        shown = "; ".join(wrong[:10]) + (f" ... ({len(wrong)} tensors)" if len(wrong) > 10 else "")
        raise WeightDtypeError(
            f"{source or 'The checkpoint'} holds tensors of the wrong kind for {type(module).__name__}: {shown}. "
            "Weights must be floating point (F32, F16, BF16, F8); the file is damaged or is not this model's "
            "checkpoint."
        )
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name not in expected:
            continue
        target_dtype = dtype if dtype is not None and tensor.is_floating_point() else None
        converted[name] = tensor.to(device=device, dtype=target_dtype) if (target_dtype or device) else tensor
    module.load_state_dict(converted, strict=False, assign=True)

    target = torch.device(device) if device is not None else torch.device("cpu")
    with torch.device(target):
        for submodule in module.modules():
            reset = getattr(submodule, "reset_non_persistent_buffers", None)
            if callable(reset):
                reset()
        if init_non_persistent is not None:
            init_non_persistent(module)
    remaining = find_meta_tensors(module)
    if remaining:
        shown = ", ".join(remaining[:20]) + (" ..." if len(remaining) > 20 else "")
        origin = f" from {source}" if source else ""
        raise MetaTensorsRemainError(
            f"After loading {type(module).__name__}{origin}, {len(remaining)} parameter(s)/buffer(s) are still on "
            f"the meta device: {shown}. Checkpoint keys that are missing must be provided (load with strict=True "
            f"to list them); non-persistent buffers must be recreated by a reset_non_persistent_buffers() "
            f"method on their module or by the init_non_persistent callback."
        )
