"""``--cache KIND:THRESHOLD``: which step cache to use, parsed and checked without torch.

Kinds: ``teacache`` (TeaCache: accumulated, polynomial-rescaled change of the first double block's modulated
input; needs coefficients fitted for the DiT) and ``fbcache`` (First-Block-Cache: relative change of the first
block's residual, no calibration). A threshold of 0 computes every step (bit-identical to no cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from diffstudio.cache.errors import StepCacheError

KINDS: dict[str, str] = {
    "teacache": "TeaCache (polynomial-rescaled change of the first block's modulated input; calibrated)",
    "fbcache": "First-Block-Cache (relative change of the first block's residual; no calibration)",
}
MAX_THRESHOLD = 1e6


@dataclass(frozen=True)
class CacheSpec:
    """One step-cache setting.

    Attributes:
        kind: ``"teacache"`` or ``"fbcache"``.
        threshold: Skip while the (accumulated) change stays below it; 0 never skips.
    """

    kind: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.kind}:{self.threshold:g}"


def check_threshold(value: Any, name: str) -> float:
    """A threshold as a float in ``[0, MAX_THRESHOLD]``.

    Raises:
        StepCacheError: Not a number, negative, infinite or NaN.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise StepCacheError(f"{name}={value!r} is not a number; pass a threshold such as 0.4 (0 or None: no cache)")
    number = float(value)
    if not math.isfinite(number) or not 0 <= number <= MAX_THRESHOLD:
        raise StepCacheError(
            f"{name}={value!r} must be a finite number in [0, {MAX_THRESHOLD:g}] (larger skips more steps; 0: off)"
        )
    return number


def parse_cache_spec(value: Any, name: str = "--cache") -> CacheSpec | None:
    """Parse ``"teacache:0.4"`` / ``"fbcache:0.1"`` (or a :class:`CacheSpec`); ``None`` / ``"off"`` is None.

    Raises:
        StepCacheError: An unknown kind, a missing or bad threshold.
    """
    if value is None or isinstance(value, CacheSpec):
        return value
    if not isinstance(value, str):
        raise StepCacheError(f"{name} {value!r} must be a string KIND:THRESHOLD, e.g. teacache:0.4 or fbcache:0.1")
    text = value.strip().lower()
    if text in ("", "off", "none"):
        return None
    kind, sep, threshold = text.partition(":")
    if kind not in KINDS:
        raise StepCacheError(
            f"{name} {value!r}: unknown cache {kind!r}; use one of {', '.join(KINDS)} (KIND:THRESHOLD)"
        )
    if not sep:
        raise StepCacheError(f"{name} {value!r}: give a threshold, e.g. {kind}:0.4")
    try:
        number = float(threshold)
    except ValueError:
        raise StepCacheError(f"{name} {value!r}: threshold {threshold!r} is not a number, e.g. {kind}:0.4") from None
    return CacheSpec(kind, check_threshold(number, f"{name} {kind}"))
