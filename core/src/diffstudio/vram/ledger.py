"""Budget accounting on one computation device, shared by the models of one pipeline.

``vram_limit`` is the pipeline's own budget: the ledger counts the bytes that memory strategies *placed* for
computation (resident layers, pinned tensors, and the transient copies of streamed layers), never the
device-wide free memory (which counts other processes). The accounting is by state, not by physical device,
so a CPU-only run simulates a GPU budget exactly (the tests rely on it).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DeviceLedger:
    """Bytes held on one computation device, per owner (a model's strategy).

    Attributes:
        device: The computation device string.
        limit: The budget in bytes, or None for no limit.
        resident: Bytes held for the whole stage, by owner (resident layers and pinned tensors).
        transient: Bytes of streamed weights currently placed (prefetched or computing).
        peak_resident: Highest ``sum(resident)`` seen.
        peak_total: Highest ``sum(resident) + transient`` seen.
    """

    device: str
    limit: int | None = None
    resident: dict[str, int] = field(default_factory=dict)
    transient: int = 0
    peak_resident: int = 0
    peak_total: int = 0

    @property
    def resident_bytes(self) -> int:
        """Bytes held by every owner."""
        return sum(self.resident.values())

    def available(self, owner: str) -> int | None:
        """Bytes ``owner`` may still hold as resident (other owners' holdings deducted); None: no limit."""
        if self.limit is None:
            return None
        others = sum(n for name, n in self.resident.items() if name != owner)
        return max(0, self.limit - others - self.resident.get(owner, 0))

    def hold(self, owner: str, nbytes: int) -> None:
        """Add ``nbytes`` to what ``owner`` holds resident."""
        self.resident[owner] = self.resident.get(owner, 0) + int(nbytes)
        self._update()

    def release(self, owner: str) -> None:
        """Drop everything ``owner`` holds resident."""
        self.resident.pop(owner, None)
        self._update()

    def place(self, nbytes: int) -> None:
        """Count ``nbytes`` of transient (streamed) weights."""
        self.transient += int(nbytes)
        self._update()

    def remove(self, nbytes: int) -> None:
        """Stop counting ``nbytes`` of transient weights."""
        self.transient = max(0, self.transient - int(nbytes))

    def reset_peaks(self) -> None:
        """Start a new measurement window (peaks = current values)."""
        self.peak_resident = self.resident_bytes
        self.peak_total = self.resident_bytes + self.transient

    def _update(self) -> None:
        held = self.resident_bytes
        self.peak_resident = max(self.peak_resident, held)
        self.peak_total = max(self.peak_total, held + self.transient)

    def as_dict(self) -> dict[str, object]:
        """The ledger as plain data (for ``vram_report()``)."""
        return {
            "device": self.device,
            "limit_bytes": self.limit,
            "resident_bytes": dict(self.resident),
            "transient_bytes": self.transient,
            "peak_resident_bytes": self.peak_resident,
            "peak_total_bytes": self.peak_total,
        }
