"""GeoChat-Bench geometry: polygon shapes it uses, and their rotated grid boxes."""

from __future__ import annotations

import json

import pytest

from geodistill.data.records import Box
from geodistill.eval.metrics import iou_matrix
from geodistill.eval.polygons import parse_polygons, polygon_to_box


def polygon_iou(a, b) -> float:
    return iou_matrix([a], [b])[0][0]


def test_polygon_to_box_round_trips_rotated_boxes():
    for box in [Box(10, 20, 40, 30, 30), Box(10, 20, 40, 30), Box(60, 10, 70, 80, 75)]:
        for w, h in [(100, 100), (800, 600)]:
            poly = box.polygon(w, h)
            back = polygon_to_box(poly, w, h)
            assert back == box
            assert polygon_iou(poly, back.polygon(w, h)) == pytest.approx(1.0)


def test_polygon_to_box_angle_convention():
    # A 40x10 px bar turned 30 degrees clockwise on screen (y down): theta = 30, whatever corner the
    # polygon starts at; a quarter-turned description folds back into [0, 90).
    poly = Box(30, 45, 70, 55, 30).polygon(100, 100)
    assert polygon_to_box(poly[1:] + poly[:1], 100, 100) == Box(30, 45, 70, 55, 30)
    assert polygon_to_box(Box(45, 30, 55, 70, -60).polygon(100, 100), 100, 100) == Box(30, 45, 70, 55, 30)


def test_polygon_to_box_keeps_border_boxes_on_the_grid():
    # A long thin bar along the diagonal: its 0..90 form would leave the grid; the box stays valid.
    poly = [(2.0, 0.0), (100.0, 98.0), (98.0, 100.0), (0.0, 2.0)]
    b = polygon_to_box(poly, 100, 100)
    assert b.problems() == []
    assert polygon_iou(poly, b.polygon(100, 100)) > 0.5


def test_parse_polygons_shapes():
    sq = [[0, 0], [4, 0], [4, 4], [0, 4]]
    assert parse_polygons(sq) == [[(0, 0), (4, 0), (4, 4), (0, 4)]]
    assert parse_polygons([sq, sq]) == parse_polygons([sq]) * 2
    assert parse_polygons([0, 0, 4, 0, 4, 4, 0, 4]) == parse_polygons(sq)
    assert parse_polygons([0, 0, 4, 4]) == parse_polygons(sq)
    assert parse_polygons(json.dumps([sq])) == parse_polygons(sq)
    for bad in [[], "nope", [[0, 0], [1, 1]], [sq, "x"], [[0, 0], [4, 0], [4, float("nan")], [0, 4]]]:
        with pytest.raises(ValueError):
            parse_polygons(bad)
