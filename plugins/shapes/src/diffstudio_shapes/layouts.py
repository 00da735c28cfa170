"""Where a spec's shape goes and how large it is: the two layouts of :func:`~diffstudio_shapes.data.sample_specs`.

``anchored`` (the default, what the embedded model is trained on): every position word has a fixed anchor
(a caption without one is centred), moved by at most :data:`POSITION_JITTER`; every size word a narrow radius
range; shapes stand upright. A caption then describes nearly one image, which is what lets a 2M-parameter DiT
trained for minutes draw the outline that the shape word names. Measured: on ``scattered`` data (centres
anywhere in their quadrant or the image, radii over a wide range, ±10° rotations) the shapes DiT learned colours,
places and sizes but drew one roundish blob for every shape word (shape class 0.275 of 200 held-out captions,
64 tokens, 8000 steps of batch 32).

``scattered``: the layout of data set generator v1, kept because the VAE recipe trains on it (an autoencoder
should see every placement and rotation) and because it reproduces the v1 streams exactly.

No torch or PIL here.
"""

from __future__ import annotations

from diffstudio_shapes.geometry import unit_outline

LAYOUTS: tuple[str, ...] = ("anchored", "scattered")

#: Radius ranges (fraction of the side) per size word; a caption without a size word draws from
#: ``DEFAULT_SIZE_RANGE``, between the two.
SIZE_RANGES: dict[str, tuple[float, float]] = {"small": (0.16, 0.18), "large": (0.25, 0.27)}
DEFAULT_SIZE_RANGE: tuple[float, float] = (0.2, 0.22)
#: The analyser's boundary between ``small`` and ``large`` (radius as a fraction of the side).
SIZE_THRESHOLD = 0.215
#: A quadrant's anchor lies this far (fraction of the side) from both midlines; ``center``, and a caption
#: without a position word, anchor at the image centre.
QUADRANT_OFFSET = 0.22
#: Each shape centre is its anchor moved by up to this much (fraction of the side) along each axis, unless the
#: data set asks for another value (``shapes-data --position-jitter``; the embedded model's recipe uses 0.035).
POSITION_JITTER = 0.01
#: The largest ``position_jitter`` accepted: beyond it a quadrant shape could be read as ``center``.
MAX_POSITION_JITTER = 0.08
#: The analyser calls a centroid ``center`` when it is closer than this to the centre along both axes.
CENTER_BAND = 0.09
#: Minimum gap between the shape and the image border (fraction of the side).
EDGE_PAD = 0.015

#: Per layout: the prefix of the per-spec seed strings and the default rotation range in degrees.
SEED_PREFIXES: dict[str, str] = {"anchored": "diffstudio-shapes/v2", "scattered": "diffstudio-shapes/v1"}
DEFAULT_ROTATION_JITTERS: dict[str, float] = {"anchored": 0.0, "scattered": 10.0}

#: ``scattered``: radius ranges per size word and without one.
SCATTERED_SIZE_RANGES: dict[str, tuple[float, float]] = {"small": (0.18, 0.22), "large": (0.28, 0.31)}
SCATTERED_ANY_SIZE_RANGE: tuple[float, float] = (0.18, 0.31)
#: ``scattered``: a quadrant's shape centre lies at least this far from both midlines.
QUADRANT_MIN_OFFSET = 0.14
#: ``scattered``: a ``center`` shape centre lies at most this far from the image centre along each axis.
CENTER_MAX_OFFSET = 0.04


def _lerp(low: float, high: float, t: float) -> float:
    return low + (high - low) * t


def _extents(shape: str, rotation: float) -> tuple[float, float, float, float]:
    """``(left, right, up, down)`` reach of the unit outline from its centre (all >= 0)."""
    points = unit_outline(shape, rotation)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return -min(xs), max(xs), -min(ys), max(ys)


def place(
    layout: str,
    shape: str,
    size_word: str | None,
    position: str | None,
    rotation: float,
    draws: tuple[float, float, float],
    position_jitter: float = POSITION_JITTER,
) -> tuple[float, float, float]:
    """Return ``(cx, cy, radius)`` (fractions of the side) of a shape from three uniform draws in ``[0, 1)``.

    Args:
        layout: One of :data:`LAYOUTS`.
        shape: The shape name.
        size_word: ``"small"``, ``"large"`` or None.
        position: A position word or None.
        rotation: Degrees, clockwise.
        draws: ``(u_radius, u_x, u_y)``.
        position_jitter: ``anchored`` only: the largest move of the centre from its anchor along each axis
            (fraction of the side; ``scattered`` places shapes by its own ranges).
    """
    if layout == "scattered":
        return _scattered(shape, size_word, position, rotation, draws)
    u_radius, u_x, u_y = draws
    low, high = SIZE_RANGES[size_word] if size_word else DEFAULT_SIZE_RANGE
    radius = _lerp(low, high, u_radius)
    jitter_x, jitter_y = position_jitter * (2 * u_x - 1), position_jitter * (2 * u_y - 1)
    if position is None or position == "center":
        return 0.5 + jitter_x, 0.5 + jitter_y, radius
    cx = 0.5 + (-QUADRANT_OFFSET if position.endswith("left") else QUADRANT_OFFSET) + jitter_x
    cy = 0.5 + (-QUADRANT_OFFSET if position.startswith("top") else QUADRANT_OFFSET) + jitter_y
    # A large shape in a quadrant shrinks (never below its size word's range) to keep EDGE_PAD to the border;
    # where even the smallest radius of its range would not fit (a wide jitter toward the border), the centre
    # moves inward instead. With the default jitter the centre never moves.
    left, right, up, down = _extents(shape, rotation)
    room = min(
        (cx - EDGE_PAD) / max(left, 1e-9),
        (1 - EDGE_PAD - cx) / max(right, 1e-9),
        (cy - EDGE_PAD) / max(up, 1e-9),
        (1 - EDGE_PAD - cy) / max(down, 1e-9),
    )
    radius = max(min(radius, room), low)
    cx = min(max(cx, EDGE_PAD + radius * left), 1 - EDGE_PAD - radius * right)
    cy = min(max(cy, EDGE_PAD + radius * up), 1 - EDGE_PAD - radius * down)
    return cx, cy, radius


def _scattered(
    shape: str, size_word: str | None, position: str | None, rotation: float, draws: tuple[float, float, float]
) -> tuple[float, float, float]:
    u_radius, u_x, u_y = draws
    low, high = SCATTERED_SIZE_RANGES[size_word] if size_word else SCATTERED_ANY_SIZE_RANGE
    radius = _lerp(low, high, u_radius)
    left, right, up, down = _extents(shape, rotation)
    if position is None:
        cx = _lerp(EDGE_PAD + radius * left, 1 - EDGE_PAD - radius * right, u_x)
        cy = _lerp(EDGE_PAD + radius * up, 1 - EDGE_PAD - radius * down, u_y)
        return cx, cy, radius
    if position == "center":
        return 0.5 + CENTER_MAX_OFFSET * (2 * u_x - 1), 0.5 + CENTER_MAX_OFFSET * (2 * u_y - 1), radius
    sx = -1.0 if position.endswith("left") else 1.0
    sy = -1.0 if position.startswith("top") else 1.0
    extent_x = left if sx < 0 else right
    extent_y = up if sy < 0 else down
    room = 0.5 - EDGE_PAD - QUADRANT_MIN_OFFSET
    radius = max(min(radius, room / max(extent_x, extent_y)), low)
    cx = 0.5 + sx * _lerp(QUADRANT_MIN_OFFSET, max(QUADRANT_MIN_OFFSET, 0.5 - EDGE_PAD - radius * extent_x), u_x)
    cy = 0.5 + sy * _lerp(QUADRANT_MIN_OFFSET, max(QUADRANT_MIN_OFFSET, 0.5 - EDGE_PAD - radius * extent_y), u_y)
    return cx, cy, radius
