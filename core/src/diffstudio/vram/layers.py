"""Per-tensor and per-unit bookkeeping of the layer-wise policy: the four states of a weight.

A managed weight is in one of these states (the seed's names):

* **offload**: the store at rest (``offload_device/dtype``; with ``"disk"`` the memory-mapped safetensors
  view itself, so nothing is in RAM);
* **onload**: the store while the model's stage runs (``onload_device/dtype``; ``"disk"`` keeps the view);
* **preparing**: the weight on the preparing device in the preparing dtype, either *resident* for the whole
  stage (chosen by the budget plan) or *streamed* into a slot right before its unit runs;
* **computation**: the weight cast to the computation dtype on the computation device for one ``forward``.

Outside a forward, the module attribute holds a *placeholder*: a zero-stride tensor of the right shape,
dtype (the computation dtype) and device (the computation device) that owns a single NaN element. Code that
inspects ``weight.dtype`` / ``.device`` / ``.shape`` keeps working, writing to it is an error, and a read
outside the leaf's forward shows up as NaN instead of silently stale values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

ALIGN = 64
"""Byte alignment of tensors carved out of flat slot buffers (the CPU allocator's alignment)."""


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to :data:`ALIGN`."""
    return (int(nbytes) + ALIGN - 1) // ALIGN * ALIGN


def nbytes_of(shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a contiguous tensor of ``shape`` and ``dtype``."""
    count = 1
    for dim in shape:
        count *= int(dim)
    return count * dtype.itemsize


def carve(buffer: Tensor, offset: int, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """A contiguous ``(shape, dtype)`` view of the flat ``uint8`` ``buffer`` starting at byte ``offset``."""
    size = nbytes_of(shape, dtype)
    return buffer[offset : offset + size].view(dtype).view(shape)


def same_place(tensor: Tensor, device: torch.device, dtype: torch.dtype) -> bool:
    """True when ``tensor`` already is on ``device`` in ``dtype`` (no copy needed)."""
    return tensor.dtype == dtype and tensor.device == device


def convert(tensor: Tensor, device: torch.device, dtype: torch.dtype, pin: bool = False) -> Tensor:
    """``tensor`` on ``device`` in ``dtype`` (the tensor itself when nothing changes); pinned if asked."""
    if same_place(tensor, device, dtype) and not (pin and not tensor.is_pinned()):
        return tensor
    out = tensor.detach().to(device=device, dtype=dtype)
    if pin and out.device.type == "cpu" and torch.cuda.is_available():
        out = out.pin_memory()
    return out


_PLACEHOLDER_BASES: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def placeholder(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A one-element (NaN for floats) tensor expanded to ``shape``; see the module docstring."""
    key = (device, dtype)
    base = _PLACEHOLDER_BASES.get(key)
    if base is None:
        fill = float("nan") if dtype.is_floating_point else 0
        base = torch.full((), fill, dtype=dtype, device=device)
        _PLACEHOLDER_BASES[key] = base
    return base.expand(shape)


@dataclass
class ManagedTensor:
    """One parameter or buffer of a leaf and its copies in each state.

    Attributes:
        owner: The module whose ``_parameters`` / ``_buffers`` holds it.
        attr: Its attribute name on ``owner``.
        is_param: Parameter (True) or buffer.
        name: Qualified state-dict name (``double_blocks.0.img_attn.qkv.weight``).
        shape: Its shape.
        compute_dtype: The dtype it computes in.
        offload_dtype: Dtype of the offload store (the file's for ``"disk"``).
        onload_dtype: Dtype in the onload state.
        preparing_dtype: Dtype in the preparing state.
        high_precision: Matched ``keep_in_high_precision`` (never stored below ``compute_dtype``).
        offload: The store at rest.
        onload: The onload copy when it differs from ``offload`` (else None).
        resident: The resident preparing copy of a resident unit (else None).
        requires_grad: The original parameter's flag.
    """

    owner: nn.Module
    attr: str
    is_param: bool
    name: str
    shape: torch.Size
    compute_dtype: torch.dtype
    offload_dtype: torch.dtype
    onload_dtype: torch.dtype
    preparing_dtype: torch.dtype
    high_precision: bool
    offload: Tensor
    onload: Tensor | None = None
    resident: Tensor | None = None
    requires_grad: bool = False
    _placeholder: Tensor | None = None

    def source(self) -> Tensor:
        """The store a streamed copy is made from: the onload copy if any, else the offload store."""
        return self.onload if self.onload is not None else self.offload

    @property
    def preparing_bytes(self) -> int:
        """Bytes in the preparing state."""
        return nbytes_of(self.shape, self.preparing_dtype)

    @property
    def compute_bytes(self) -> int:
        """Bytes in the computation state."""
        return nbytes_of(self.shape, self.compute_dtype)

    def bind(self, tensor: Tensor) -> None:
        """Make ``tensor`` the module attribute (for one forward)."""
        if self.is_param:
            self.owner._parameters[self.attr] = tensor  # type: ignore[assignment]
        else:
            self.owner._buffers[self.attr] = tensor

    def unbind(self, device: torch.device) -> None:
        """Put the placeholder back (see the module docstring)."""
        if self._placeholder is None or self._placeholder.device != device:
            value = placeholder(self.shape, self.compute_dtype, device)
            self._placeholder = nn.Parameter(value, requires_grad=False) if self.is_param else value
        self.bind(self._placeholder)


@dataclass(eq=False)
class Leaf:
    """A leaf module and the indices (into its unit's ``tensors``) of the weights its forward reads."""

    name: str
    module: nn.Module
    unit: Unit
    indices: list[int]
    cast_bytes: int = 0
    bound: list[Tensor] = field(default_factory=list)
    acquired_here: bool = False


@dataclass(eq=False)
class Unit:
    """A group of weights that moves together: one repeated block, or one leaf outside the blocks.

    Attributes:
        name: Qualified module name.
        module: The module whose forward brackets the unit's use (the block, or the leaf).
        order: Registration order (the initial guess of the execution order).
        is_block: Part of ``repeated_blocks``.
        tensors: Its managed tensors.
        leaves: Its leaves.
        resident: Chosen by the budget plan to stay in the preparing state for the whole stage.
        prepared: The weights in the preparing state while the unit is acquired (resident copies or slot
            views), aligned with ``tensors``; None when not acquired.
        slot: The streaming slot holding it, if any.
        users: Nesting depth of acquisitions (a unit is released when it drops to zero).
    """

    name: str
    module: nn.Module
    order: int
    is_block: bool
    tensors: list[ManagedTensor] = field(default_factory=list)
    leaves: list[Leaf] = field(default_factory=list)
    resident: bool = False
    prepared: list[Tensor] | None = None
    slot: Any = None
    users: int = 0

    @property
    def preparing_bytes(self) -> int:
        """Bytes of the unit in the preparing state (what residency costs, and what a fetch places)."""
        return sum(t.preparing_bytes for t in self.tensors)

    def copy_bytes(self, device: torch.device) -> int:
        """Slot bytes a fetch to ``device`` needs (tensors whose store is not already in the preparing place)."""
        return sum(
            aligned(t.preparing_bytes) for t in self.tensors if not same_place(t.source(), device, t.preparing_dtype)
        )
