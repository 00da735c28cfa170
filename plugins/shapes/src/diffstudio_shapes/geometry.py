"""Shape outlines at radius 1: the canonical geometry shared by the renderer and the analyser.

Coordinates have y pointing down (image convention); rotations are clockwise on screen, in degrees. "Radius" is
the circle radius, the square half-side, the triangle and star circumradius and the zigzag half-length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from diffstudio.errors import ConfigError

STAR_INNER_RATIO = 0.5
ZIGZAG_SEGMENTS = 4
ZIGZAG_AMPLITUDE = 0.25
ZIGZAG_STROKE = 0.4


def _zigzag_outline() -> list[tuple[float, float]]:
    """A thick zigzag stroke (mitred joints, butt ends) of half-length about 1, centred on its area centroid."""
    n, half = ZIGZAG_SEGMENTS, ZIGZAG_STROKE / 2
    xs = [-1.0 + half + i * (2.0 - 2 * half) / n for i in range(n + 1)]
    line = [(x, ZIGZAG_AMPLITUDE if i % 2 == 0 else -ZIGZAG_AMPLITUDE) for i, x in enumerate(xs)]
    normals = []
    for (x0, y0), (x1, y1) in zip(line, line[1:]):
        length = math.hypot(x1 - x0, y1 - y0)
        normals.append((-(y1 - y0) / length, (x1 - x0) / length))
    left, right = [], []
    for i, (px, py) in enumerate(line):
        if i == 0 or i == n:
            nx, ny = normals[0] if i == 0 else normals[-1]
            ox, oy = nx * half, ny * half
        else:
            sx, sy = normals[i - 1][0] + normals[i][0], normals[i - 1][1] + normals[i][1]
            scale = 2 * half / (sx * sx + sy * sy)
            ox, oy = sx * scale, sy * scale
        left.append((px + ox, py + oy))
        right.append((px - ox, py - oy))
    polygon = left + right[::-1]
    gx, gy = polygon_centroid(polygon)
    return [(x - gx, y - gy) for x, y in polygon]


def _unit_outline(shape: str) -> list[tuple[float, float]]:
    if shape == "circle":
        return [(math.cos(2 * math.pi * k / 256), math.sin(2 * math.pi * k / 256)) for k in range(256)]
    if shape == "square":
        return [(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]
    if shape == "triangle":
        return [(math.cos(math.radians(a)), math.sin(math.radians(a))) for a in (-90.0, 30.0, 150.0)]
    if shape == "star":
        return [
            (
                (1.0 if k % 2 == 0 else STAR_INNER_RATIO) * math.cos(math.radians(-90.0 + 36.0 * k)),
                (1.0 if k % 2 == 0 else STAR_INNER_RATIO) * math.sin(math.radians(-90.0 + 36.0 * k)),
            )
            for k in range(10)
        ]
    if shape == "zigzag":
        return _zigzag_outline()
    raise ConfigError(f"Unknown shape {shape!r}; expected circle, square, triangle, star or zigzag.")


def polygon_area(points: Sequence[tuple[float, float]]) -> float:
    """Area of a simple polygon (shoelace formula), always positive."""
    total = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, [*points[1:], points[0]]))
    return abs(total) / 2


def polygon_centroid(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Area centroid of a simple polygon."""
    a = cx = cy = 0.0
    for (x0, y0), (x1, y1) in zip(points, [*points[1:], points[0]]):
        cross = x0 * y1 - x1 * y0
        a += cross
        cx += (x0 + x1) * cross
        cy += (y0 + y1) * cross
    return cx / (3 * a), cy / (3 * a)


def unit_outline(shape: str, rotation: float = 0.0) -> list[tuple[float, float]]:
    """The outline of a shape of radius 1 centred on the origin (y down), rotated clockwise by ``rotation`` degrees.

    Circles come back as a 256-gon.
    """
    cos, sin = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    return [(x * cos - y * sin, x * sin + y * cos) for x, y in _unit_outline(shape)]


def area_factor(shape: str) -> float:
    """Area of the shape at radius 1 (circle: pi, square: 4, ...); the analyser's size estimate uses it."""
    return math.pi if shape == "circle" else polygon_area(_unit_outline(shape))
