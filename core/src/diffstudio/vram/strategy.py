"""``LayerwiseStrategy``: the builtin ``vram_policy`` answer for models with memory fields.

Built once per model from its declared :mod:`memory metadata <diffstudio.vram.metadata>` and the user's
:class:`~diffstudio.types.MemoryBudget`; afterwards plain objects and forward hooks run the inner loop.

Residency rule (decided at ``onload``, i.e. before the stage's first step, never first-come-first-served):

1. Pinned tensors (outside any leaf) are always placed; they count first.
2. Without ``vram_limit`` every unit is resident. Otherwise, if every unit plus one computation cast fits in
   what the pipeline's ledger leaves this model, every unit is resident.
3. Else a streaming window is reserved, ``(depth + 1) * largest unit + largest cast`` (``depth`` is 0 off
   CUDA), and units become resident while they fit in the rest: first the units outside the repeated blocks,
   in registration order (small, used every step), then the repeated blocks in a spread order (van der
   Corput over the block sequence) so resident blocks interleave with streamed ones and the prefetcher has
   compute to hide copies behind. Everything else streams on every call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from diffstudio.devices import DISK
from diffstudio.types import MemoryBudget
from diffstudio.vram.layers import Leaf, ManagedTensor, Unit, aligned, carve, convert, same_place
from diffstudio.vram.ledger import DeviceLedger
from diffstudio.vram.metadata import ModelLayout
from diffstudio.vram.report import VramReport, format_bytes
from diffstudio.vram.streaming import Streamer

logger = logging.getLogger("diffstudio.vram")


def _vdc(index: int) -> float:
    """The ``index``-th van der Corput number in base 2 (0, 0.5, 0.25, 0.75, ...)."""
    value, denominator = 0.0, 1.0
    while index:
        denominator *= 2
        index, bit = divmod(index, 2)
        value += bit / denominator
    return value


def spread_order(count: int) -> list[int]:
    """``range(count)`` reordered so that every prefix is spread evenly over the range."""
    order: list[int] = []
    seen: set[int] = set()
    j = 0
    while len(order) < count:
        index = min(count - 1, int(_vdc(j) * count))
        j += 1
        if index not in seen:
            seen.add(index)
            order.append(index)
        if j > 4 * count + 8:  # fill any gaps left by rounding
            order.extend(i for i in range(count) if i not in seen)
            break
    return order


class LayerwiseStrategy:
    """Per-layer offload / onload / preparing / computation for one model (see the module docstring).

    Args:
        component: The model's pipeline slot (``"dit"``), used in reports and as the ledger owner.
        budget: The user's settings (devices, dtypes, ``vram_limit``, prefetch depth).
        ledger: The pipeline's ledger for the computation device (shared with its other models).
    """

    name = "layerwise"

    def __init__(self, component: str, budget: MemoryBudget, ledger: DeviceLedger) -> None:
        self.component = component
        self.budget = budget
        self.ledger = ledger
        self.compute_device = torch.device(budget.computation_device)
        self.compute_dtype: torch.dtype = budget.computation_dtype
        self.preparing_device = torch.device(budget.preparing_device)
        self.disk_offload = budget.offload_device == DISK
        self.host = torch.device("cpu") if self.disk_offload else torch.device(budget.offload_device)
        self.streams_on_cuda = self.preparing_device.type == "cuda" and torch.cuda.is_available()
        self.depth = max(0, int(budget.prefetch_depth)) if self.streams_on_cuda else 0
        self.units: list[Unit] = []
        self.pinned: list[ManagedTensor] = []
        self.layout = ModelLayout()
        self.onloaded = False
        self.streamer: Streamer | None = None
        self.calls = 0
        self._next: dict[int, int] = {}
        self._last: Unit | None = None
        self._scratch: Tensor | None = None
        self._scratch_bytes = 0
        self._handles: list[Any] = []
        self._index: dict[int, int] = {}
        self._module: nn.Module | None = None

    # -- apply ----------------------------------------------------------------------------------------------

    def apply(self, module: Any) -> Any:
        """Take over ``module``'s weights: build the stores, install placeholders and hooks; log a summary."""
        if not isinstance(module, nn.Module):
            raise TypeError(f"the layer-wise policy manages torch modules, got {type(module).__name__}")
        self._module = module
        self.layout = ModelLayout.of(module)
        blocks = self.layout.blocks(module)
        leaves = list(self.layout.leaves_of(module))
        shared = _shared_tensor_ids(module)
        order = {id(m): i for i, m in enumerate(module.modules())}
        by_block: dict[str, Unit] = {}
        managed: set[tuple[int, str]] = set()  # (id(owner), attr): an aliased module has one set of tensors
        for leaf_name, leaf in leaves:
            block = next(((n, b) for n, b in blocks if leaf_name.startswith(n + ".")), None)
            if block is None:
                unit = Unit(leaf_name, leaf, order[id(leaf)], is_block=False)
                self.units.append(unit)
            else:
                unit = by_block.get(block[0]) or Unit(block[0], block[1], order[id(block[1])], is_block=True)
                if block[0] not in by_block:
                    by_block[block[0]] = unit
                    self.units.append(unit)
            entry = Leaf(leaf_name, leaf, unit, [])
            for owner_name, owner in leaf.named_modules(prefix=leaf_name):
                for attr, is_param, tensor in _own_tensors(owner):
                    if tensor is None or id(tensor) in shared:
                        continue
                    name = f"{owner_name}.{attr}"
                    entry.indices.append(len(unit.tensors))
                    unit.tensors.append(self._manage(owner, attr, is_param, name, tensor))
                    managed.add((id(owner), attr))
            if entry.indices:
                entry.cast_bytes = sum(
                    aligned(unit.tensors[i].compute_bytes)
                    for i in entry.indices
                    if unit.tensors[i].preparing_dtype != unit.tensors[i].compute_dtype
                    or self.preparing_device != self.compute_device
                )
                unit.leaves.append(entry)
        self.units = [u for u in self.units if u.tensors]
        self.units.sort(key=lambda u: u.order)
        self._index = {id(unit): i for i, unit in enumerate(self.units)}
        for i, unit in enumerate(self.units[:-1]):
            self._next[id(unit)] = i + 1
        self._scratch_bytes = max((leaf.cast_bytes for u in self.units for leaf in u.leaves), default=0)
        for owner_name, owner in module.named_modules():
            for attr, is_param, tensor in _own_tensors(owner):
                name = f"{owner_name}.{attr}" if owner_name else attr
                if tensor is not None and (id(owner), attr) not in managed:
                    self.pinned.append(self._pin(owner, attr, is_param, name, tensor))
        self._install_hooks()
        logger.info(self.summary())
        return module

    def _dtype(self, tensor: Tensor, state_dtype: Any, high: bool, fallback: torch.dtype) -> torch.dtype:
        if not tensor.is_floating_point():
            return tensor.dtype
        if state_dtype is None or state_dtype == DISK:
            return fallback
        dtype: torch.dtype = state_dtype
        if high and dtype.itemsize < self.compute_dtype.itemsize:
            return self.compute_dtype
        return dtype

    def _manage(self, owner: nn.Module, attr: str, is_param: bool, name: str, tensor: Tensor) -> ManagedTensor:
        b = self.budget
        high = self.layout.high_precision(name)
        compute = self.compute_dtype if tensor.is_floating_point() else tensor.dtype
        stored = tensor.dtype
        offload_dtype = stored if self.disk_offload else self._dtype(tensor, b.offload_dtype, high, stored)
        onload_dtype = self._dtype(tensor, b.onload_dtype, high, offload_dtype)
        preparing_dtype = self._dtype(tensor, b.preparing_dtype, high, onload_dtype)
        if self.disk_offload:
            store = tensor.detach()
        else:
            store = convert(tensor, self.host, offload_dtype, pin=self.streams_on_cuda)
        managed = ManagedTensor(
            owner, attr, is_param, name, tensor.shape, compute, offload_dtype, onload_dtype, preparing_dtype,
            high, store, requires_grad=bool(tensor.requires_grad),
        )  # fmt: skip
        managed.unbind(self.compute_device)
        return managed

    def _pin(self, owner: nn.Module, attr: str, is_param: bool, name: str, tensor: Tensor) -> ManagedTensor:
        """Tensors outside the leaves: whole-model moves; params take the computation dtype."""
        keep = not is_param and self.layout.high_precision(name)
        dtype = self.compute_dtype if tensor.is_floating_point() and not keep else tensor.dtype
        host = convert(tensor, self.host, dtype)
        pinned = ManagedTensor(
            owner, attr, is_param, name, tensor.shape, dtype, dtype, dtype, dtype, keep, host,
            requires_grad=bool(tensor.requires_grad),
        )  # fmt: skip
        pinned.bind(_as_attr(host, pinned))
        return pinned

    def _install_hooks(self) -> None:
        for unit in self.units:
            self._handles.append(unit.module.register_forward_pre_hook(self._unit_pre(unit)))
            for leaf in unit.leaves:
                self._handles.append(leaf.module.register_forward_pre_hook(self._leaf_pre(leaf)))
                self._handles.append(leaf.module.register_forward_hook(self._leaf_post(leaf)))
            self._handles.append(unit.module.register_forward_hook(self._unit_post(unit)))

    # -- stage transitions ------------------------------------------------------------------------------------

    def onload(self) -> None:
        """Enter the model's stage: place pinned tensors, plan residency, build resident and onload copies."""
        if self.onloaded:
            return
        self.onloaded = True
        self._last = None
        pinned_bytes = 0
        for t in self.pinned:
            t.resident = convert(t.offload, self.compute_device, t.compute_dtype)
            t.bind(_as_attr(t.resident, t))
            pinned_bytes += t.compute_bytes
        self.ledger.hold(self.component, pinned_bytes)
        self._plan(self.ledger.available(self.component))
        onload_device = self.budget.onload_device
        for unit in self.units:
            for t in unit.tensors:
                if unit.resident:
                    t.resident = convert(_through_onload(t), self.preparing_device, t.preparing_dtype)
                elif onload_device not in (DISK, str(self.compute_device)):
                    t.onload = convert(t.offload, torch.device(onload_device), t.onload_dtype, pin=self.streams_on_cuda)
                    if t.onload is t.offload:
                        t.onload = None
            if unit.resident:
                self.ledger.hold(self.component, unit.preparing_bytes)
                unit.prepared = [t.resident for t in unit.tensors]  # type: ignore[misc]
        streamed = [u.copy_bytes(self.preparing_device) for u in self.units if not u.resident]
        self.streamer = Streamer(self.preparing_device, self.depth, max(streamed, default=0), self.ledger)

    def offload(self) -> None:
        """Leave the stage: drop every copy on the computation device; weights rest in their offload stores."""
        if not self.onloaded:
            return
        if self.streamer is not None:
            self.streamer.close()
            self.streamer = None
        for unit in self.units:
            unit.prepared, unit.slot, unit.users = None, None, 0
            for t in unit.tensors:
                t.resident = t.onload = None
            for leaf in unit.leaves:
                self._unbind(leaf)
        for t in self.pinned:
            t.resident = None
            t.bind(_as_attr(t.offload, t))
        self._scratch = None
        self.ledger.release(self.component)
        self.onloaded = False

    def _plan(self, available: int | None) -> None:
        for unit in self.units:
            unit.resident = False
        costs = [u.preparing_bytes for u in self.units]
        cast = self._scratch_bytes
        if available is None or sum(costs) + cast <= available:
            for unit in self.units:
                unit.resident = True
            return
        room = available - cast - (self.depth + 1) * max(costs, default=0)
        blocks = [u for u in self.units if u.is_block]
        others = [u for u in self.units if not u.is_block]
        for unit in others + [blocks[i] for i in spread_order(len(blocks))]:
            if unit.preparing_bytes <= room:
                unit.resident = True
                room -= unit.preparing_bytes

    # -- the inner loop ---------------------------------------------------------------------------------------

    def _enter(self, unit: Unit) -> None:
        if not self.onloaded:
            self.onload()
        unit.users += 1
        if self._last is not None and self._last is not unit:
            self._next[id(self._last)] = self._index[id(unit)]
        self._last = unit
        if unit.resident:
            return
        assert self.streamer is not None
        self.streamer.acquire(unit)
        if self.streamer.asynchronous:
            self._prefetch_after(unit)

    def _prefetch_after(self, unit: Unit) -> None:
        assert self.streamer is not None
        queued, current = 0, unit
        for _ in range(len(self.units)):
            following = self._next.get(id(current))
            if following is None or queued >= self.depth:
                return
            current = self.units[following]
            if current is unit:
                return
            if not current.resident:
                if not self.streamer.prefetch(current):
                    return
                queued += 1

    def _leave(self, unit: Unit) -> None:
        unit.users = max(0, unit.users - 1)
        if unit.users == 0 and not unit.resident and self.streamer is not None:
            self.streamer.release(unit)

    def _unit_pre(self, unit: Unit) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self._enter(unit)

        return hook

    def _unit_post(self, unit: Unit) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._leave(unit)

        return hook

    def _leaf_pre(self, leaf: Leaf) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            unit = leaf.unit
            leaf.acquired_here = unit.prepared is None
            if leaf.acquired_here:
                self._enter(unit)
            assert unit.prepared is not None
            grad = torch.is_grad_enabled()
            offset = 0
            for i in leaf.indices:
                t = unit.tensors[i]
                src = unit.prepared[i]
                if same_place(src, self.compute_device, t.compute_dtype):
                    in_slot = src is not t.resident and src is not t.source()
                    value = src.clone() if grad and in_slot else src  # autograd may keep it past the slot
                elif grad:
                    value = src.to(device=self.compute_device, dtype=t.compute_dtype)
                else:
                    value = carve(self._scratch_buffer(), offset, t.shape, t.compute_dtype)
                    value.copy_(src)
                    offset += aligned(t.compute_bytes)
                t.bind(value)
            if leaf.cast_bytes:
                self.ledger.place(leaf.cast_bytes)
            self.calls += 1

        return hook

    def _leaf_post(self, leaf: Leaf) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._unbind(leaf)
            if leaf.cast_bytes:
                self.ledger.remove(leaf.cast_bytes)
            if leaf.acquired_here:
                leaf.acquired_here = False
                self._leave(leaf.unit)

        return hook

    def _unbind(self, leaf: Leaf) -> None:
        for i in leaf.indices:
            leaf.unit.tensors[i].unbind(self.compute_device)

    def _scratch_buffer(self) -> Tensor:
        if self._scratch is None:
            self._scratch = torch.empty(self._scratch_bytes, dtype=torch.uint8, device=self.compute_device)
        return self._scratch

    # -- visibility ----------------------------------------------------------------------------------------

    def report(self) -> VramReport:
        """What sits where, in which dtype, and how many bytes (plain data)."""
        tensors = [t for u in self.units for t in u.tensors]
        resident = [u for u in self.units if u.resident]
        return VramReport(
            component=self.component,
            strategy=self.name,
            onloaded=self.onloaded,
            units=len(self.units),
            leaves=sum(len(u.leaves) for u in self.units),
            resident_units=len(resident),
            streamed_units=len(self.units) - len(resident),
            offload=f"{self.budget.offload_device}/{_dtypes(t.offload_dtype for t in tensors)}",
            onload=f"{self.budget.onload_device}/{_dtypes(t.onload_dtype for t in tensors)}",
            preparing=f"{self.budget.preparing_device}/{_dtypes(t.preparing_dtype for t in tensors)}",
            computation=f"{self.compute_device}/{str(self.compute_dtype).removeprefix('torch.')}",
            offload_bytes=sum(t.offload.numel() * t.offload.element_size() for t in tensors),
            resident_bytes=sum(u.preparing_bytes for u in resident),
            pinned_bytes=sum(t.compute_bytes for t in self.pinned),
            high_precision_tensors=sum(1 for t in tensors if t.high_precision),
            vram_limit_bytes=self.ledger.limit,
            prefetch_depth=self.depth,
            fetches=self.streamer.fetches if self.streamer is not None else 0,
            ledger=self.ledger.as_dict(),
        )

    def summary(self) -> str:
        """The one-line load summary."""
        r = self.report()
        where = "disk (memory-mapped)" if self.disk_offload else r.offload
        limit = "none" if r.vram_limit_bytes is None else format_bytes(r.vram_limit_bytes)
        return (
            f"vram[{self.component}]: {r.leaves} layers in {r.units} units; offload {where} "
            f"{format_bytes(r.offload_bytes)}; onload {r.onload}; preparing {r.preparing}; compute "
            f"{r.computation}; {r.high_precision_tensors} tensors kept high-precision; pinned "
            f"{format_bytes(r.pinned_bytes)}; vram_limit {limit}; prefetch depth {r.prefetch_depth}"
        )


def _dtypes(dtypes: Iterable[torch.dtype]) -> str:
    names = sorted({str(d).removeprefix("torch.") for d in dtypes})
    return "+".join(names) if names else "-"


def _own_tensors(module: nn.Module) -> list[tuple[str, bool, Tensor | None]]:
    params = [(name, True, p) for name, p in module._parameters.items()]
    buffers = [(name, False, b) for name, b in module._buffers.items()]
    return params + buffers


def _shared_tensor_ids(module: nn.Module) -> set[int]:
    """Ids of tensors held by more than one module or attribute (tied weights): pinned, not streamed.

    A module registered under several names holds its tensors once: it is one leaf (``ModelLayout.leaves_of``)
    whose tensors stream like any other (T5's ``shared`` / ``encoder.embed_tokens``).
    """
    seen: dict[int, int] = {}
    for owner in module.modules():  # each module once, whatever its names
        for _, _, tensor in _own_tensors(owner):
            if tensor is not None:
                seen[id(tensor)] = seen.get(id(tensor), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def _through_onload(t: ManagedTensor) -> Tensor:
    """The offload store as it looks after passing the onload state (quantised when onload is narrower)."""
    if t.onload_dtype.itemsize < min(t.offload_dtype.itemsize, t.preparing_dtype.itemsize):
        return t.offload.to(t.onload_dtype)
    return t.offload


def _as_attr(tensor: Tensor, managed: ManagedTensor) -> Tensor:
    if managed.is_param and not isinstance(tensor, nn.Parameter):
        return nn.Parameter(tensor, requires_grad=False)
    return tensor
