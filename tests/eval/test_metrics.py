"""Metrics of the four evaluation tasks: known values and garbage model outputs."""

from __future__ import annotations

import math

import pytest

from geodistill.data.records import Box, parse_boxes
from geodistill.errors import DataError
from geodistill.eval.metrics import (
    OTHER,
    SIZE_THRESHOLDS,
    ReferringItem,
    caption_metrics,
    classification_metrics,
    iou_matrix,
    match_count,
    normalize_answer,
    object_size,
    referring_metrics,
    vqa_metrics,
)


def rotated_iou(a: Box, b: Box, width: float, height: float) -> float:
    """IoU of two grid boxes in the pixels of a width x height image, as referring_metrics computes it."""
    return iou_matrix([a.polygon(width, height)], [b.polygon(width, height)])[0][0]


def match_boxes(pred: list[Box], gt: list[Box], threshold: float) -> int:
    """Matched gt boxes of one prediction on a 100 x 100 image, as referring_metrics counts them."""
    ious = iou_matrix([p.polygon(100, 100) for p in pred], [g.polygon(100, 100) for g in gt])
    return match_count(ious, threshold)


# ---------------------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("Yes.", "yes"),
        ("  The   Airport ", "airport"),
        ("Two cars!", "2 cars"),
        ("1,000", "1000"),
        ("2.5 m", "2.5 m"),
        ("Dense_Residential", "dense residential"),
        ("don't", "dont"),
        ("", ""),
        ("?!.", ""),
    ],
)
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


# ---------------------------------------------------------------------------------------- rotated IoU


def test_rotated_iou_identical_and_disjoint():
    a = Box(10, 10, 30, 30)
    assert rotated_iou(a, a, 100, 100) == pytest.approx(1.0)
    assert rotated_iou(a, Box(50, 50, 60, 60), 100, 100) == 0.0


def test_rotated_iou_square_turned_90_degrees_is_itself():
    assert rotated_iou(Box(10, 10, 30, 30), Box(10, 10, 30, 30, 90), 100, 100) == pytest.approx(1.0)


def test_rotated_iou_half_overlap_is_one_third():
    # Two 20x10 boxes sharing half their area: 100 / (200 + 200 - 100).
    assert rotated_iou(Box(0, 0, 20, 10), Box(10, 0, 30, 10), 100, 100) == pytest.approx(1 / 3)


def test_rotated_iou_hand_computed_rotations():
    # A square and itself turned 45 degrees: the overlap is a regular octagon of area 2(sqrt2 - 1) s^2,
    # so IoU = 2(sqrt2 - 1) / (2 - 2(sqrt2 - 1)) = 1 / sqrt2.
    sq = Box(40, 40, 60, 60)
    assert rotated_iou(sq, Box(40, 40, 60, 60, 45), 100, 100) == pytest.approx(1 / math.sqrt(2))
    # A 40x20 rectangle and itself turned 90 degrees: a 20x20 overlap, 400 / (800 + 800 - 400).
    assert rotated_iou(Box(30, 40, 70, 60), Box(30, 40, 70, 60, 90), 100, 100) == pytest.approx(1 / 3)


def test_rotated_iou_on_a_non_square_image_rotates_in_pixels():
    # On 200x100 px, the grid box (40,0)-(60,40) is 40x40 px: a square, so a quarter turn is itself.
    a, b = Box(40, 0, 60, 40), Box(40, 0, 60, 40, 90)
    assert rotated_iou(a, b, 200, 100) == pytest.approx(1.0)
    assert rotated_iou(a, b, 100, 100) < 0.5  # on a square image it is a 20x40 rectangle


# ------------------------------------------------------------------------------------------- matching


def test_match_boxes_duplicate_predictions_match_one_gt():
    a, b = Box(0, 0, 10, 10), Box(50, 50, 60, 60)
    assert match_boxes([a, a, a], [a, b], 0.5) == 1
    assert match_boxes([b, a], [a, b], 0.5) == 2
    assert match_boxes([], [a, b], 0.5) == 0
    assert match_boxes([a], [], 0.5) == 0


def test_match_boxes_greedy_by_descending_iou():
    gt1, gt2 = Box(0, 0, 20, 10), Box(10, 0, 30, 10)
    exact2 = Box(10, 0, 30, 10)  # IoU 1 with gt2, 1/3 with gt1
    # The exact box takes gt2 first; the duplicate then can only take gt1 (IoU 1/3).
    assert match_boxes([exact2, exact2], [gt1, gt2], 0.25) == 2
    assert match_boxes([exact2, exact2], [gt1, gt2], 0.5) == 1


def test_parse_boxes_on_garbage_never_raises():
    for text in [
        "",
        "no box here",
        "{<10><20>",
        "<10><20><30><40>",
        "{<a><b><c><d>}",
        "{<1><2><3>}",
        "}{<<>>",
    ]:
        assert parse_boxes(text) == []
    assert len(parse_boxes("junk {<10><20> then {<1><2><30><40>|<5>} tail")) == 1


def test_object_size_thresholds():
    def square(frac: float) -> list[tuple[float, float]]:
        s = math.sqrt(frac) * 100  # side on a 100x100 image
        return [(0, 0), (s, 0), (s, s), (0, s)]

    assert object_size([square(SIZE_THRESHOLDS["small"] * 0.9)], 100, 100) == "small"
    assert object_size([square(SIZE_THRESHOLDS["small"] * 1.1)], 100, 100) == "medium"
    assert object_size([square(SIZE_THRESHOLDS["medium"] * 1.1)], 100, 100) == "large"


def test_referring_metrics_counts_unparseable_and_breaks_down():
    a, b = Box(0, 0, 10, 10), Box(50, 50, 60, 60)
    items = [
        ReferringItem(a.to_text(), (a,), 100, 100, size="small", kind="ref"),  # hit
        ReferringItem("I cannot see it.", (b,), 100, 100, size="small", kind="ref"),  # unparseable
        ReferringItem("", (a,), 100, 100, kind="ref"),  # empty: unparseable, size computed
        ReferringItem(a.to_text() * 3, (a, b), 100, 100, kind="grounding"),  # multi; duplicates hit one
        ReferringItem("{<0><0><20><10>}", (Box(10, 0, 30, 10),), 100, 100, kind="grounding"),  # IoU 1/3
    ]
    m = referring_metrics(items)
    assert m["n_items"] == 5 and m["n_gt"] == 6 and m["unparsed"] == 2
    assert m["acc@0.5"] == pytest.approx(2 / 6)
    assert m["acc@0.25"] == pytest.approx(3 / 6)
    assert m["precision@0.5"] == pytest.approx(2 / 5)
    assert m["by_size"]["small"]["acc@0.5"] == pytest.approx(1 / 2)
    assert m["by_size"]["small"]["n_items"] == 2
    assert m["by_size"]["medium"]["n_items"] == 3  # computed: 1 % and 2 % of the image
    assert m["by_objects"]["multi"]["acc@0.5"] == pytest.approx(1 / 2)
    assert m["by_objects"]["single"]["acc@0.25"] == pytest.approx(2 / 4)
    assert set(m["by_type"]) == {"ref", "grounding"}
    assert m["by_type"]["ref"]["unparsed"] == 2


def test_referring_metrics_uses_exact_polygons_and_survives_garbage():
    poly = ((0.0, 0.0), (10.0, 0.0), (10.0, 10.0), (0.0, 10.0))
    item = ReferringItem("{<0><0><10><10>}", (Box(0, 0, 10, 10),), 100, 100, gt_polygons=(poly,))
    assert referring_metrics([item])["acc@0.5"] == 1.0
    garbage = ReferringItem("{<99><99><1><1>|<720>}}}{<5><5><5><5>}", (Box(0, 0, 10, 10),), 100, 100)
    m = referring_metrics([garbage])
    assert m["acc@0.25"] == 0.0 and m["unparsed"] == 0
    empty = referring_metrics([])
    assert empty["acc@0.5"] is None and empty["n_gt"] == 0


def test_referring_item_from_meta():
    meta = {"boxes": ["{<0><0><10><10>}"], "width": 100, "height": 100, "size": "small", "multi": False}
    item = ReferringItem.from_meta("{<0><0><10><10>}", meta)
    assert item.gt == (Box(0, 0, 10, 10),) and item.size == "small"
    with pytest.raises(DataError, match="width"):
        ReferringItem.from_meta("", {"boxes": []})
    with pytest.raises(DataError, match="must be positive"):
        referring_metrics([ReferringItem("", (Box(0, 0, 10, 10),), 0, 100)])
    assert iou_matrix([], [Box(0, 0, 1, 1).polygon(10, 10)]) == []


# ------------------------------------------------------------------------------------ classification


def test_classification_oa_vs_aa_on_an_imbalanced_set():
    classes = ["forest", "denseresidential", "airport"]
    labels = ["forest"] * 8 + ["denseresidential"] * 2
    preds = ["Forest."] * 8 + ["Dense Residential", "a city"]
    m = classification_metrics(preds, labels, classes)
    assert m["OA"] == pytest.approx(0.9)
    assert m["AA"] == pytest.approx((1.0 + 0.5) / 2)  # airport has no test image: left out
    assert m["per_class"] == {"forest": 1.0, "denseresidential": 0.5, "airport": None}
    assert m["cols"] == [*classes, OTHER]
    assert m["confusion"] == [[8, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0]]
    assert m["unparsed"] == 1 and m["n"] == 10


def test_classification_all_wrong_majority_shows_the_difference():
    labels = ["a"] * 9 + ["b"]
    m = classification_metrics(["a"] * 10, labels, ["a", "b"])
    assert m["OA"] == pytest.approx(0.9) and m["AA"] == pytest.approx(0.5)


def test_classification_rejects_unknown_labels_and_ambiguous_classes():
    with pytest.raises(DataError, match="not one of"):
        classification_metrics(["x"], ["lake"], ["forest"])
    with pytest.raises(DataError, match="same class"):
        classification_metrics([], [], ["dense residential", "DenseResidential"])
    with pytest.raises(ValueError, match="same length"):
        classification_metrics(["a"], [], ["a"])


# ------------------------------------------------------------------------------------------------- VQA


def test_vqa_per_type_and_moa():
    preds = ["Yes, there is.", "no", "two", "3", "", "urban"]
    answers = ["yes", "yes", "2", "4", "rural", "Urban"]
    qtypes = ["presence", "presence", "count", "count", "rural_urban", "rural_urban"]
    m = vqa_metrics(preds, answers, qtypes)
    assert m["accuracy"] == {"count": 0.5, "presence": 0.5, "rural_urban": 0.5}
    assert m["n"] == {"count": 2, "presence": 2, "rural_urban": 2}
    assert m["mOA"] == pytest.approx(0.5) and m["OA"] == pytest.approx(0.5)
    assert m["empty"] == 1


def test_vqa_moa_weights_types_equally():
    m = vqa_metrics(["yes"] * 3 + ["1"], ["yes"] * 3 + ["2"], ["presence"] * 3 + ["count"])
    assert m["OA"] == pytest.approx(0.75) and m["mOA"] == pytest.approx(0.5)
    assert vqa_metrics([], [], [])["mOA"] is None


# ------------------------------------------------------------------------------------- region captions


def test_rouge_on_known_pairs(meteor):
    m = caption_metrics(["the cat sat", "the cars"], [["the cat ran"], ["a car"]], meteor=meteor)
    # Pair 1: 2 of 3 unigrams and an LCS of 2 on both sides -> F = 2/3; pair 2: "cars" stems to "car",
    # rouge-score keeps "the"/"a" -> 1 of 2 tokens on each side -> F = 1/2.
    assert m["rouge1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["rougeL"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    same = caption_metrics(["a small white boat"], [["a small white boat"]], meteor=meteor)
    assert same["rouge1"] == pytest.approx(1.0) and same["meteor"] > 0.9


def test_caption_metrics_counts_empty_predictions(meteor):
    preds = ["", "a car\non the road", "  \t "]
    m = caption_metrics(preds, [["a car"], ["a car on the road"], "a house"], meteor=meteor)
    assert m["empty"] == 2 and m["n"] == 3 and 0.0 <= m["meteor"] <= 1.0


def test_caption_metrics_edge_cases(meteor):
    assert caption_metrics([], [], meteor=meteor)["meteor"] is None
    with pytest.raises(DataError, match="no non-empty reference"):
        caption_metrics(["x"], [["", " "]], meteor=meteor)
