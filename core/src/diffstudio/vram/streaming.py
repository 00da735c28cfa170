"""Streaming of non-resident units into fixed slots, with prefetch on a CUDA side stream.

A :class:`Streamer` owns ``depth + 1`` slots on the preparing device, each a flat ``uint8`` buffer as large as
the biggest streamed unit (allocated on first use, freed when the model is offloaded, so the allocator never
sees per-step allocations). Fetching a unit copies each of its tensors from its store (onload copy or offload
store, possibly the memory-mapped file) into a slot view in the preparing dtype; tensors already in the
preparing place are used as they are.

On CUDA the copies run on a side stream: the next ``depth`` units predicted by the strategy are fetched while
the current one computes. Host sources that are not pinned (memory-mapped files, dtype changes) go through a
pinned staging buffer per slot first. Events order everything: a slot's ``ready`` event (side stream, after its
copies) is waited on by the compute stream before use; its ``free`` event (compute stream, after the unit ran)
is waited on by the side stream before the slot is overwritten; its ``staged`` event guards the pinned staging
buffer on the host. On any other device the same path runs synchronously at the moment a unit is needed
(prefetching would only hold memory earlier).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffstudio.vram.layers import Unit, aligned, carve, same_place
from diffstudio.vram.ledger import DeviceLedger


@dataclass(eq=False)
class Slot:
    """One streaming buffer and who is in it."""

    buffer: Tensor | None = None
    staging: Tensor | None = None
    unit: Unit | None = None
    ready: Any = None
    free: Any = None
    staged: Any = None


class Streamer:
    """Fetches streamed units into slots (see the module docstring).

    Args:
        device: The preparing device.
        depth: Prefetch depth (units fetched ahead of the running one); used only on CUDA.
        slot_bytes: Size of one slot (the largest streamed unit's copy bytes).
        ledger: Where transient bytes are accounted.
    """

    def __init__(self, device: torch.device, depth: int, slot_bytes: int, ledger: DeviceLedger) -> None:
        self.device = device
        self.asynchronous = device.type == "cuda" and torch.cuda.is_available()
        self.depth = max(0, int(depth)) if self.asynchronous else 0
        self.slot_bytes = int(slot_bytes)
        self.ledger = ledger
        self.slots = [Slot() for _ in range(self.depth + 1)]
        self.stream: Any = torch.cuda.Stream(device=device) if self.asynchronous else None  # type: ignore[no-untyped-call]
        self.fetches = 0

    # -- public --------------------------------------------------------------------------------------------

    def acquire(self, unit: Unit) -> None:
        """Make ``unit.prepared`` valid for computing now (fetching synchronously if it was not prefetched)."""
        if unit.slot is None:
            slot = self._free_slot(evict=True)
            assert slot is not None
            self._fetch(unit, slot)
        if self.asynchronous and unit.slot is not None and unit.slot.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(unit.slot.ready)

    def prefetch(self, unit: Unit) -> bool:
        """Start fetching ``unit`` ahead of time (CUDA only); False when no slot is free."""
        if not self.asynchronous or unit.slot is not None or unit.resident:
            return unit.slot is not None
        slot = self._free_slot(evict=False)
        if slot is None:
            return False
        self._fetch(unit, slot)
        return True

    def release(self, unit: Unit) -> None:
        """The unit finished computing: its slot may be reused (after the compute stream is done with it)."""
        slot = unit.slot
        if slot is None:
            return
        if self.asynchronous:
            if slot.free is None:
                slot.free = torch.cuda.Event()  # type: ignore[no-untyped-call]
            slot.free.record(torch.cuda.current_stream(self.device))
        self._drop(unit)

    def close(self) -> None:
        """Drop every slot and buffer (the model is being offloaded)."""
        if self.asynchronous:
            torch.cuda.current_stream(self.device).synchronize()
            if self.stream is not None:
                self.stream.synchronize()
        for slot in self.slots:
            if slot.unit is not None:
                self._drop(slot.unit)
            slot.buffer = None
            slot.staging = None

    # -- internals -------------------------------------------------------------------------------------------

    def _free_slot(self, *, evict: bool) -> Slot | None:
        for slot in self.slots:
            if slot.unit is None:
                return slot
        if not evict:
            return None
        # every slot holds a unit: drop a prefetched one that is not computing (a misprediction)
        for slot in self.slots:
            if slot.unit is not None and slot.unit.users == 0:
                self._drop(slot.unit)
                return slot
        raise RuntimeError(
            f"all {len(self.slots)} streaming slots are in use by running units; raise the prefetch depth "
            f"or check that units do not nest"
        )

    def _drop(self, unit: Unit) -> None:
        slot = unit.slot
        if slot is not None and slot.unit is unit:
            slot.unit = None
        unit.slot = None
        unit.prepared = None
        self.ledger.remove(unit.preparing_bytes)

    def _buffers(self, slot: Slot, staged: bool) -> None:
        if slot.buffer is None:
            slot.buffer = torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)
        if staged and slot.staging is None:
            slot.staging = torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=True)

    def _fetch(self, unit: Unit, slot: Slot) -> None:
        slot.unit = unit
        unit.slot = slot
        self.fetches += 1
        self.ledger.place(unit.preparing_bytes)
        if not self.asynchronous:
            unit.prepared = self._copy_all(unit, slot, staged=False)
            return
        assert self.stream is not None
        needs_staging = any(
            not same_place(t.source(), self.device, t.preparing_dtype)
            and not (t.source().is_pinned() and t.source().dtype == t.preparing_dtype)
            for t in unit.tensors
        )
        if needs_staging and slot.staged is not None:
            slot.staged.synchronize()  # the previous H2D copy out of this staging buffer is done
        with torch.cuda.stream(self.stream):
            if slot.free is not None:
                self.stream.wait_event(slot.free)
            unit.prepared = self._copy_all(unit, slot, staged=True)
            if slot.ready is None:
                slot.ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
            slot.ready.record(self.stream)
            if needs_staging:
                if slot.staged is None:
                    slot.staged = torch.cuda.Event()  # type: ignore[no-untyped-call]
                slot.staged.record(self.stream)

    def _copy_all(self, unit: Unit, slot: Slot, *, staged: bool) -> list[Tensor]:
        prepared: list[Tensor] = []
        offset = 0
        for t in unit.tensors:
            src = t.source()
            if same_place(src, self.device, t.preparing_dtype):
                prepared.append(src)
                continue
            self._buffers(slot, staged and self.asynchronous)
            assert slot.buffer is not None
            view = carve(slot.buffer, offset, t.shape, t.preparing_dtype)
            if (
                self.asynchronous
                and src.device.type == "cpu"
                and not (src.is_pinned() and src.dtype == t.preparing_dtype)
            ):
                assert slot.staging is not None
                host = carve(slot.staging, offset, t.shape, t.preparing_dtype)
                host.copy_(src)  # reads the file / converts on the host, into pinned memory
                view.copy_(host, non_blocking=True)
            else:
                view.copy_(src, non_blocking=self.asynchronous)
            prepared.append(view)
            offset += aligned(t.preparing_bytes)
        return prepared
