import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from geodistill.data.records import Box, format_boxes, infer_task, parse_boxes, parse_phrases, parse_record
from geodistill.errors import DataError

coord = st.integers(0, 100)


@st.composite
def boxes(draw):
    x1, x2 = sorted(draw(st.lists(coord, min_size=2, max_size=2, unique=True)))
    y1, y2 = sorted(draw(st.lists(coord, min_size=2, max_size=2, unique=True)))
    theta = draw(st.one_of(st.none(), st.integers(-90, 180)))
    return Box(x1, y1, x2, y2, theta)


@given(st.lists(boxes(), min_size=1, max_size=5))
def test_box_text_round_trip(bs):
    text = format_boxes(bs)
    assert parse_boxes(text) == bs
    assert parse_boxes(f"<p>planes</p> {text} and more") == bs


def test_geochat_examples():
    bs = parse_boxes("{<8><82><16><90>|<69>}{<6><44><14><48>|<32>}")
    assert bs == [Box(8, 82, 16, 90, 69), Box(6, 44, 14, 48, 32)]
    assert parse_boxes("{<1.5><2><3><4>}") == [Box(1.5, 2, 3, 4, None)]
    assert Box(1.5, 2, 3, 4).to_text() == "{<1.5><2><3><4>}"


def test_garbage_text_has_no_boxes():
    for text in ["", "no boxes", "{<1><2><3>}", "{<a><b><c><d>}", "<1><2><3><4>", "{<1><2><3><4>|<x>}"]:
        assert parse_boxes(text) == []


def test_box_problems():
    assert Box(0, 0, 100, 100).problems() == []
    assert "outside" in Box(0, 0, 101, 10).problems()[0]
    assert "inverted" in Box(50, 10, 40, 20).problems()[0]
    assert Box(10, 10, 10, 20).problems()  # empty


def test_polygon_rotation():
    # A 20x10 box centred at (50, 50) on a 200x100 image: pixels scale x by 2.
    poly = Box(40, 45, 60, 55).polygon(200, 100)
    assert poly == [(80, 45), (120, 45), (120, 55), (80, 55)]
    # Rotated by 90 degrees: width and height swap around the same centre.
    rot = Box(40, 45, 60, 55, 90).polygon(100, 100)
    xs, ys = [p[0] for p in rot], [p[1] for p in rot]
    assert math.isclose(min(xs), 45, abs_tol=1e-9) and math.isclose(max(xs), 55, abs_tol=1e-9)
    assert math.isclose(min(ys), 40, abs_tol=1e-9) and math.isclose(max(ys), 60, abs_tol=1e-9)
    # Clockwise on screen (y down): the first corner (top-left) moves to the top-right.
    x0, y0 = Box(40, 40, 60, 60, 90).polygon(100, 100)[0]
    assert math.isclose(x0, 60, abs_tol=1e-9) and math.isclose(y0, 40, abs_tol=1e-9)


def test_phrases_and_task_inference():
    assert parse_phrases("<p>a red ship</p> {<1><2><3><4>} <p> plane </p>") == ["a red ship", "plane"]
    assert infer_task("<image>\n[refer] <p>x</p>") == "referring"
    assert infer_task("<image>\n[identify] {<1><2><3><4>}") == "region_caption"
    assert infer_task("<image>\n[grounding] describe") == "grounding_description"
    assert infer_task("<image>\nWhat is this?") == "conversation"


def good():
    return {
        "id": "r1",
        "image": "a.png",
        "task": "referring",
        "conversations": [
            {"from": "human", "value": "<image>\n[refer] <p>ship</p>"},
            {"from": "gpt", "value": "{<1><2><30><40>|<10>}"},
        ],
    }


def test_parse_record_ok():
    r = parse_record(good(), source="f.json", index=0)
    assert r.image_id == "a" and r.answers == ["{<1><2><30><40>|<10>}"]
    assert parse_record(r.to_dict(), source="f.json", index=0) == r


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.pop("image"), "'image'"),
        (lambda d: d.pop("conversations"), "'conversations'"),
        (lambda d: d["conversations"][0].update({"from": "system"}), "conversations[0].from"),
        (lambda d: d["conversations"][1].update({"value": "  "}), "conversations[1].value"),
        (lambda d: d["conversations"][1].update({"value": "{<1><2><130><40>}"}), "conversations[1].value"),
        (lambda d: d["conversations"][1].update({"value": "{<50><2><30><40>}"}), "conversations[1].value"),
        (lambda d: d["conversations"][0].update({"value": "no image"}), "conversations[0].value"),
        (lambda d: d.update({"task": "dance"}), "'task'"),
        (lambda d: d["conversations"].pop(), "conversations[0]"),
    ],
)
def test_bad_records_name_file_record_and_field(mutate, field):
    d = good()
    mutate(d)
    with pytest.raises(DataError) as e:
        parse_record(d, source="data/x.json", index=3)
    msg = str(e.value)
    assert "data/x.json" in msg and "'r1'" in msg and field in msg


def test_record_without_id_is_named_by_position():
    d = good()
    del d["id"]
    with pytest.raises(DataError, match=r"record #7"):
        parse_record(d, source="x.json", index=7)
