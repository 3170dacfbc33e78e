"""GeoChat-Bench's ground-truth geometry: pixel polygons in its shapes, and their rotated grid boxes."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from shapely.geometry import MultiPoint, Polygon

from geodistill.data.records import Box


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def parse_polygons(gt: Any) -> list[list[tuple[float, float]]]:
    """Ground-truth polygons in pixels, from the shapes GeoChat-Bench uses.

    Accepted: one polygon ``[[x, y] x 4]`` or ``[x1, y1, ..., x4, y4]``, an axis-aligned
    ``[x1, y1, x2, y2]``, a list of any of these, or the same as a JSON string. Raises ValueError.
    """
    if isinstance(gt, str):
        try:
            gt = json.loads(gt)
        except json.JSONDecodeError as e:
            raise ValueError(f"a string that is not JSON ({e.msg})") from e

    def one(p: Any) -> list[tuple[float, float]] | None:
        if isinstance(p, list | tuple):
            if len(p) == 4 and all(isinstance(q, list | tuple) and len(q) == 2 for q in p):
                if all(_is_number(v) for q in p for v in q):
                    return [(float(q[0]), float(q[1])) for q in p]
                raise ValueError(f"corner coordinates must be finite numbers: {p!r}")
            if len(p) == 8 and all(_is_number(v) for v in p):
                return [(float(p[k]), float(p[k + 1])) for k in range(0, 8, 2)]
            if len(p) == 4 and all(_is_number(v) for v in p):
                x1, y1, x2, y2 = (float(v) for v in p)
                return [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
        return None

    single = one(gt)
    if single is not None:
        return [single]
    if isinstance(gt, list | tuple) and gt:
        polys = [one(p) for p in gt]
        bad = [k for k, p in enumerate(polys) if p is None]
        if not bad:
            return polys  # type: ignore[return-value]
        raise ValueError(
            f"item {bad[0]} ({gt[bad[0]]!r:.80}) is not a polygon [[x, y] x 4], [x1, y1, ..., x4, y4] "
            "or [x1, y1, x2, y2]"
        )
    raise ValueError(f"expected a polygon or a non-empty list of polygons, got {gt!r:.80}")


def polygon_to_box(points: Sequence[tuple[float, float]], width: float, height: float) -> Box:
    """The rotated grid box of a pixel quadrilateral (its minimum-area rectangle), on GeoChat's integer
    0-100 grid.

    Angle convention (as :meth:`Box.polygon`): ``(x1, y1, x2, y2)`` is the box before rotation, turned
    about its centre by theta degrees clockwise on screen (image y down), theta in [0, 90) as in
    GeoChat's data. The rectangle is rotated in pixel space, so on a non-square image the grid box is
    scaled per axis before rotation. Where the unrotated box would leave the grid (a long, thin, tilted
    object at the border) the equivalent form with theta - 90 is tried, then the box is clipped; exact
    IoU uses the original polygon, kept in ``meta["polygons"]``.
    """
    rect = MultiPoint(points).minimum_rotated_rectangle
    if not isinstance(rect, Polygon) or rect.area <= 0:
        raise ValueError(f"degenerate polygon {list(points)!r} (no area)")
    c = list(rect.exterior.coords)[:4]
    (x0, y0), (x1, y1), (x2, y2) = c[0], c[1], c[2]
    w, h = math.hypot(x1 - x0, y1 - y0), math.hypot(x2 - x1, y2 - y1)
    # Direction of the box's "width" edge, on GeoChat's integer-degree grid, then folded into [0, 90):
    # a quarter turn swaps which side is the width.
    theta = round(math.degrees(math.atan2(y1 - y0, x1 - x0)))
    turns = theta // 90
    theta -= 90 * turns
    if turns % 2:
        w, h = h, w
    cx, cy = rect.centroid.x, rect.centroid.y
    sx, sy = 100.0 / width, 100.0 / height

    def grid(bw: float, bh: float) -> list[float]:
        xy = [(cx - bw / 2) * sx, (cy - bh / 2) * sy, (cx + bw / 2) * sx, (cy + bh / 2) * sy]
        return [float(round(v)) for v in xy]

    def overflow(o: tuple[float, float, int]) -> float:
        return sum(max(0.0, -v, v - 100.0) for v in grid(o[0], o[1]))

    best = min([(w, h, theta), (h, w, theta - 90)], key=overflow)  # min keeps the first on a tie
    gx1, gy1, gx2, gy2 = grid(best[0], best[1])
    t = best[2]
    gx1, gy1 = min(max(gx1, 0.0), 99.0), min(max(gy1, 0.0), 99.0)
    gx2, gy2 = max(min(gx2, 100.0), gx1 + 1.0), max(min(gy2, 100.0), gy1 + 1.0)  # at least one grid cell
    return Box(gx1, gy1, gx2, gy2, None if t == 0 else float(t))
