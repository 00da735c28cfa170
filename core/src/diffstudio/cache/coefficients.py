"""TeaCache rescale polynomials and the DiTs they belong to.

A polynomial maps TeaCache's estimator (the relative L1 change of the first double block's modulated image input
between two steps) to the expected relative change of the DiT's output. It is fitted for one model: used on
another, it silently changes how many steps are skipped. So coefficients carry the DiT shape they were fitted on
(:class:`DitShape`), and :func:`resolve_coefficients` refuses a mismatch unless the caller names a built-in set
explicitly (then it warns).

Where coefficients come from, in order: the call argument ``tea_cache_coefficients`` (a list of numbers, a JSON
file written by ``diffstudio cache calibrate``, or a built-in name such as ``"flux1-dev"``); a
``<DiT file stem>.teacache.json`` or ``teacache.json`` beside the DiT's weights; the built-in FLUX.1-dev set for a
FLUX.1 DiT of dev's shape (19 double / 38 single blocks, width 3072: dev, schnell, Kontext, Krea).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from diffstudio.cache.errors import CacheCoefficientsError

FORMAT = "diffstudio-teacache/1"


@dataclass(frozen=True)
class DitShape:
    """What identifies a DiT for its coefficients: family, block counts and width."""

    family: str
    double_blocks: int
    single_blocks: int
    hidden_size: int

    def __str__(self) -> str:
        blocks = f"{self.double_blocks} double / {self.single_blocks} single blocks"
        return f"{self.family} DiT, {blocks}, width {self.hidden_size}"


@dataclass(frozen=True)
class Coefficients:
    """A fitted rescale polynomial (highest power first) and the DiT it was fitted for.

    Attributes:
        polynomial: ``f(r) = c0 r^n + ... + cn``.
        shape: The DiT shape it belongs to (None: unbound, e.g. numbers passed by hand).
        name: Where it comes from (built-in name or file), for messages and reports.
        fit: Calibration details (prompts, steps, residual error), as written by ``cache calibrate``.
    """

    polynomial: tuple[float, ...]
    shape: DitShape | None = None
    name: str = ""
    fit: dict[str, Any] | None = None

    def __call__(self, x: float) -> float:
        """Evaluate ``f(x)`` by Horner's rule (the same operations as ``numpy.poly1d``)."""
        y = 0.0
        for c in self.polynomial:
            y = y * x + c
        return y

    def to_json(self) -> dict[str, Any]:
        """The JSON object :func:`load_coefficients` reads."""
        return {"format": FORMAT, "polynomial": list(self.polynomial),
                "dit": None if self.shape is None else asdict(self.shape), "name": self.name,
                "fit": self.fit or {}}  # fmt: skip


FLUX1_DEV = Coefficients(
    (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01),
    DitShape("flux1", 19, 38, 3072),
    "flux1-dev",
)
"""TeaCache's published FLUX polynomial (ali-vilab/TeaCache ``TeaCache4FLUX``), fitted on FLUX.1-dev."""

BUILTIN: dict[str, Coefficients] = {"flux1-dev": FLUX1_DEV}


def check_polynomial(values: Any, where: str) -> tuple[float, ...]:
    """A non-empty list of finite numbers as a tuple of floats.

    Raises:
        CacheCoefficientsError: Anything else.
    """
    if not isinstance(values, (list, tuple)) or not values or len(values) > 16:
        raise CacheCoefficientsError(f"{where}: coefficients must be a list of 1 to 16 numbers, got {values!r}")
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CacheCoefficientsError(f"{where}: coefficient {value!r} is not a finite number")
        out.append(float(value))
    return tuple(out)


def load_coefficients(path: str | Path) -> Coefficients:
    """Read a coefficients JSON (written by ``diffstudio cache calibrate``).

    Raises:
        CacheCoefficientsError: The file is missing, not JSON, or lacks a valid ``polynomial`` / ``dit``.
    """
    from diffstudio._io import read_json

    try:
        data = read_json(Path(path), max_bytes=1 << 20)
    except (OSError, ValueError) as exc:
        raise CacheCoefficientsError(f"tea_cache_coefficients {path}: cannot read it ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CacheCoefficientsError(f"{path}: not a TeaCache coefficients file (expected format {FORMAT!r})")
    polynomial = check_polynomial(data.get("polynomial"), str(path))
    dit = data.get("dit")
    shape = None
    if dit is not None:
        try:
            shape = DitShape(str(dit["family"]), int(dit["double_blocks"]), int(dit["single_blocks"]),
                             int(dit["hidden_size"]))  # fmt: skip
        except (KeyError, TypeError, ValueError):
            raise CacheCoefficientsError(
                f"{path}: 'dit' must have family, double_blocks, single_blocks, hidden_size"
            ) from None
    fit = data.get("fit") if isinstance(data.get("fit"), dict) else None
    return Coefficients(polynomial, shape, str(data.get("name") or Path(path).name), fit)


def save_coefficients(coefficients: Coefficients, path: str | Path) -> Path:
    """Write ``coefficients`` as JSON (to a temporary name, then renamed)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(json.dumps(coefficients.to_json(), indent=2) + "\n", encoding="utf-8")
    temporary.replace(target)
    return target


def beside(dit_files: Sequence[str]) -> list[Path]:
    """Candidate coefficient files for a DiT loaded from ``dit_files``: ``<stem>.teacache.json``, ``teacache.json``."""
    if not dit_files:
        return []
    first = Path(dit_files[0])
    return [first.with_name(f"{first.stem}.teacache.json"), first.with_name("teacache.json")]


def resolve_coefficients(requested: Any, shape: DitShape, dit_files: Sequence[str] = ()) -> Coefficients:
    """The coefficients TeaCache uses for a DiT of ``shape`` (see the module docstring for the order).

    Args:
        requested: None, a built-in name, a JSON path, a list of numbers or :class:`Coefficients`.
        shape: The DiT's shape.
        dit_files: The files the DiT was loaded from (coefficient files are looked for beside them).

    Raises:
        CacheCoefficientsError: None fit this DiT, or a file / built-in set was fitted for another shape.
    """
    if isinstance(requested, Coefficients):
        chosen = requested
    elif isinstance(requested, (list, tuple)):
        return Coefficients(check_polynomial(requested, "tea_cache_coefficients"), None, "given")
    elif isinstance(requested, str) and requested in BUILTIN:
        chosen = BUILTIN[requested]
        if chosen.shape != shape:
            warnings.warn(f"TeaCache coefficients {requested!r} were fitted for a {chosen.shape}, not this {shape}; "
                          "the skip rate and quality will differ (fit your own with `diffstudio cache calibrate`)",
                          UserWarning, stacklevel=3)  # fmt: skip
        return chosen
    elif isinstance(requested, (str, Path)):
        chosen = load_coefficients(requested)
    elif requested is None:
        found = next((p for p in beside(dit_files) if p.is_file()), None)
        if found is not None:
            chosen = load_coefficients(found)
        elif shape == FLUX1_DEV.shape:
            return FLUX1_DEV
        else:
            raise CacheCoefficientsError(
                f"tea_cache_l1_thresh: no TeaCache coefficients are fitted for this {shape} (the built-in ones are "
                f"FLUX.1-dev's: {FLUX1_DEV.shape}); fit them with `diffstudio cache calibrate --model ...` (writes "
                f"<DiT>.teacache.json beside the weights), pass tea_cache_coefficients=FILE, or use --cache fbcache:0.1"
            )
    else:
        raise CacheCoefficientsError(
            f"tea_cache_coefficients={requested!r}: expected a JSON file, a list of numbers or one of {sorted(BUILTIN)}"
        )
    if chosen.shape is not None and chosen.shape != shape:
        raise CacheCoefficientsError(
            f"TeaCache coefficients {chosen.name!r} were fitted for a {chosen.shape}, not this {shape}; fit this "
            f"DiT's with `diffstudio cache calibrate` (or force: tea_cache_coefficients='flux1-dev', with a warning)"
        )
    return chosen
