"""Shape outlines, boxes, relations and layout checks (pure geometry, no drawing)."""

from __future__ import annotations

import math

from .vocabulary import REGIONS

__all__ = [
    "shape_outline",
    "shape_extent",
    "bounding_radius",
    "object_box",
    "relation_between",
    "region_of",
    "ring_width",
]


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    pts = []
    for k in range(2 * points):
        rad = 1.0 if k % 2 == 0 else inner
        ang = -math.pi / 2 + k * math.pi / points
        pts.append((rad * math.cos(ang), rad * math.sin(ang)))
    ys = [p[1] for p in pts]
    shift = -(min(ys) + max(ys)) / 2  # centre the vertical extent
    return [(x, y + shift) for x, y in pts]


_A = 0.33  # half-width of the cross arms
_E = 0.9   # half-length of the cross arms

#: Unit outlines (radius 1, centred, symmetric extents).  ``None`` = ellipse.
_OUTLINES: dict[str, list[tuple[float, float]] | None] = {
    "circle": None,
    "ring": None,
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(0.0, -0.85), (0.95, 0.85), (-0.95, 0.85)],
    "diamond": [(0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)],
    "hexagon": [(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)],
    "star": _star(),
    "cross": [
        (-_A, -_E), (_A, -_E), (_A, -_A), (_E, -_A), (_E, _A), (_A, _A),
        (_A, _E), (-_A, _E), (-_A, _A), (-_E, _A), (-_E, -_A), (-_A, -_A),
    ],
}


def _extent(shape: str) -> tuple[float, float]:
    pts = _OUTLINES[shape]
    if pts is None:
        return 1.0, 1.0
    return max(abs(p[0]) for p in pts), max(abs(p[1]) for p in pts)


_EXTENTS = {s: _extent(s) for s in _OUTLINES}
_BOUNDING = {
    s: (1.0 if pts is None else max(math.hypot(*p) for p in pts)) for s, pts in _OUTLINES.items()
}


def shape_outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon vertices in pixels, or ``None`` for ellipse-drawn shapes (circle, ring)."""
    pts = _OUTLINES[shape]
    if pts is None:
        return None
    return [(cx + r * x, cy + r * y) for x, y in pts]


def shape_extent(shape: str) -> tuple[float, float]:
    """Half-width and half-height of the unit shape."""
    return _EXTENTS[shape]


def bounding_radius(shape: str) -> float:
    """Radius of the smallest centred circle containing the unit shape."""
    return _BOUNDING[shape]


def ring_width(r: float) -> int:
    return max(2, int(round(0.4 * r)))


def object_box(shape: str, cx: float, cy: float, r: float) -> tuple[int, int, int, int]:
    """Pixel box ``(x0, y0, x1, y1)`` (x1, y1 exclusive) covered by the drawn shape."""
    ex, ey = _EXTENTS[shape]
    return (
        int(math.floor(cx - r * ex)),
        int(math.floor(cy - r * ey)),
        int(math.floor(cx + r * ex)) + 1,
        int(math.floor(cy + r * ey)) + 1,
    )


def relation_between(a: tuple[float, float], b: tuple[float, float]) -> str:
    """Relation of point ``a`` with respect to point ``b`` along the dominant axis."""
    dx = a[0] - b[0]
    dy = a[1] - b[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def region_of(cx: float, cy: float, image_size: int) -> str:
    """3x3 grid cell name of a point."""
    col = min(2, max(0, int(3 * cx / image_size)))
    row = min(2, max(0, int(3 * cy / image_size)))
    return REGIONS[(col, row)]
