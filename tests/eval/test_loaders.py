"""Benchmark loaders on tiny files written in each benchmark's real layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from geodistill.data.records import parse_boxes
from geodistill.errors import DataError
from geodistill.eval.loaders import (
    load_geochat_referring,
    load_geochat_region_captions,
    load_rsvqa,
    load_scene_folder,
    readable_class,
    rsvqa_files,
)
from geodistill.eval.metrics import ReferringItem, referring_metrics


def _image(path: Path, size: tuple[int, int] = (8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".tif": "TIFF", ".png": "PNG"}[path.suffix]
    Image.new("RGB", size, (10, 120, 30)).save(path, format=fmt)


def _truncated_png(path: Path) -> None:
    """A PNG whose header reads (size, mode) but whose pixel data stops early: fails only when decoded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.effect_noise((64, 64), 50).convert("RGB").save(path, format="PNG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# -------------------------------------------------------------------------------------- UCMerced / AID


@pytest.mark.parametrize(
    ("folder", "name"),
    [
        ("denseresidential", "denseresidential"),
        ("Dense_Residential", "dense residential"),
        ("DenseResidential", "dense residential"),
        ("baseball-field", "baseball field"),
    ],
)
def test_readable_class(folder, name):
    assert readable_class(folder) == name


def test_scene_folder(tmp_path):
    root = tmp_path / "UCMerced_LandUse" / "Images"
    _image(root / "Dense_Residential" / "denseresidential00.tif")
    _image(root / "Dense_Residential" / "denseresidential01.tif")
    _image(root / "airplane" / "airplane00.jpg")
    (root / "airplane" / "Thumbs.db").write_bytes(b"x")  # not an image: ignored
    res = load_scene_folder(root, dataset="ucm")
    assert res.skipped == [] and len(res.records) == 3
    r = res.records[0]
    assert r.task == "scene" and r.id == "ucm/airplane/airplane00.jpg"
    assert r.image == "airplane/airplane00.jpg" and (root / r.image).is_file()
    assert r.first_question == (
        "<image>\nClassify the image in the following classes: airplane, dense residential. "
        "Answer in one word or a short phrase."
    )
    assert r.answers == ["airplane"]
    assert dict(r.meta) == {
        "label": "airplane",
        "classes": ["airplane", "dense residential"],
        "dataset": "ucm",
    }
    assert [x.meta["label"] for x in res.records[1:]] == ["dense residential"] * 2


def test_scene_folder_empty_class_raises_or_is_counted(tmp_path):
    _image(tmp_path / "forest" / "f1.png")
    (tmp_path / "river").mkdir()
    with pytest.raises(DataError, match="river"):
        load_scene_folder(tmp_path)
    res = load_scene_folder(tmp_path, on_error="skip")
    assert res.n_skipped == 1 and "river" in res.skipped[0]
    assert [r.meta["classes"] for r in res.records] == [["forest"]]
    with pytest.raises(DataError, match="not found"):
        load_scene_folder(tmp_path / "missing")


def test_scene_folder_truncated_image_is_named_when_loaded(tmp_path):
    """AID layout with one truncated PNG: a DataError naming the file at load time (not a PIL traceback
    mid-generation), or a counted skip."""
    _image(tmp_path / "Airport" / "airport_1.png")
    _truncated_png(tmp_path / "Airport" / "airport_2.png")
    _image(tmp_path / "Forest" / "forest_1.png")
    with pytest.raises(DataError, match=r"airport_2\.png', field 'image': image file .*airport_2\.png"):
        load_scene_folder(tmp_path, dataset="aid")
    res = load_scene_folder(tmp_path, dataset="aid", on_error="skip")
    assert [r.id for r in res.records] == ["aid/Airport/airport_1.png", "aid/Forest/forest_1.png"]
    assert res.n_skipped == 1 and "airport_2.png" in res.skipped[0] and "unreadable" in res.skipped[0]


def test_scene_folder_same_stem_gives_two_items(tmp_path):
    _image(tmp_path / "forest" / "x.png")
    _image(tmp_path / "forest" / "x.tif")
    res = load_scene_folder(tmp_path, dataset="d")
    assert [r.id for r in res.records] == ["d/forest/x.png", "d/forest/x.tif"]
    assert len({r.image_id for r in res.records}) == 2


def test_scene_folder_refuses_a_symlink_out_of_the_folder(tmp_path):
    _image(tmp_path / "outside" / "secret.png")
    root = tmp_path / "scenes"
    _image(root / "forest" / "a.png")
    (root / "forest" / "b.png").symlink_to(tmp_path / "outside" / "secret.png")
    with pytest.raises(DataError, match=r"field 'image': image path 'forest/b\.png' resolves outside"):
        load_scene_folder(root)
    res = load_scene_folder(root, on_error="skip")
    assert [r.image for r in res.records] == ["forest/a.png"] and res.n_skipped == 1


# ---------------------------------------------------------------------------------------------- RSVQA


def _rsvqa(tmp_path: Path, questions: list[dict], answers: list[dict], images: list[dict]) -> tuple:
    prefix = "USGS_split_test_phili"
    for kind, items in (("questions", questions), ("answers", answers), ("images", images)):
        (tmp_path / f"{prefix}_{kind}.json").write_text(json.dumps({kind: items}))
    return rsvqa_files(tmp_path, prefix)


def _q(qid: int, img: int, text: str, qtype: str, aid: int, active: bool = True) -> dict:
    return {
        "id": qid,
        "date_added": 1.5e9,
        "img_id": img,
        "people_id": 0,
        "type": qtype,
        "question": text,
        "answers_ids": [aid],
        "active": active,
    }


def _a(aid: int, qid: int, answer: str) -> dict:
    return {
        "id": aid,
        "date_added": 1.5e9,
        "question_id": qid,
        "people_id": 0,
        "answer": answer,
        "active": True,
    }


@pytest.fixture
def rsvqa(tmp_path):
    images = tmp_path / "Data"
    _image(images / "0.tif")
    _image(images / "1.png")
    qs = [
        _q(0, 0, "Is there a road?", "presence", 0),
        _q(1, 0, "How many buildings are there?", "count", 1),
        _q(2, 1, "Is it a rural or an urban area", "rural_urban", 2),
        _q(3, 1, "Is there a bridge?", "presence", 3, active=False),
        _q(4, 2, "Is there water?", "presence", 4),  # its image is inactive
    ]
    ans = [_a(0, 0, "yes"), _a(1, 1, "12"), _a(2, 2, "urban"), _a(3, 3, "no"), _a(4, 4, "no")]
    imgs = [
        {"id": 0, "questions_ids": [0, 1], "original_name": "x.tif", "active": True},
        {"id": 1, "questions_ids": [2, 3], "original_name": "y.tif", "active": True},
        {"id": 2, "questions_ids": [4], "original_name": "z.tif", "active": False},
    ]
    return _rsvqa(tmp_path, qs, ans, imgs), images


def test_rsvqa(rsvqa):
    files, images = rsvqa
    res = load_rsvqa(*files, images)
    assert res.skipped == []
    assert [r.meta["qtype"] for r in res.records] == ["presence", "count", "rural_urban"]
    r = res.records[0]
    assert r.task == "vqa" and r.image == "0.tif" and r.image_id == "0"
    assert r.first_question == "<image>\nIs there a road? Answer the question using a single word or phrase."
    assert r.answers == ["yes"] and r.meta["answers"] == ["yes"]
    assert res.records[2].image == "1.png"
    assert res.records[1].id == "USGS_split_test_phili/1"
    only = load_rsvqa(*files, images, qtypes={"presence", "rural_urban"})
    assert [r.meta["qtype"] for r in only.records] == ["presence", "rural_urban"]


def test_rsvqa_bad_input_names_file_record_and_field(tmp_path):
    images = tmp_path / "Data"
    _image(images / "0.tif")
    qs = [_q(0, 0, "Is there a road?", "presence", 0), _q(1, 0, "Is there a tree?", "presence", 99)]
    files = _rsvqa(tmp_path, qs, [_a(0, 0, "yes")], [{"id": 0, "questions_ids": [0, 1], "active": True}])
    with pytest.raises(DataError, match=r"_questions\.json: record 1, field 'answers_ids'"):
        load_rsvqa(*files, images)
    res = load_rsvqa(*files, images, on_error="skip")
    assert len(res.records) == 1 and res.n_skipped == 1 and "99" in res.skipped[0]


def test_rsvqa_missing_image_file(tmp_path):
    images = tmp_path / "Data"
    images.mkdir()
    files = _rsvqa(tmp_path, [_q(0, 7, "Is there a road?", "presence", 0)], [_a(0, 0, "yes")], [{"id": 7}])
    with pytest.raises(DataError, match="field 'img_id': no image 7"):
        load_rsvqa(*files, images)


def test_rsvqa_image_outside_the_folder_or_truncated(tmp_path):
    images = tmp_path / "Data"
    _image(images / "0.tif")
    _image(tmp_path / "secret.tif")
    (images / "7.tif").symlink_to(tmp_path / "secret.tif")  # listed in the folder, but points out of it
    _image(tmp_path / "8.tif")  # beside the folder: "../8" is not in its listing
    _truncated_png(images / "3.png")
    qs = [_q(i, img, "Is there a road?", "presence", 0) for i, img in enumerate([0, 7, "../8", 3])]
    files = _rsvqa(tmp_path, qs, [_a(0, 0, "yes")], [{"id": i} for i in (0, 7, "../8", 3)])
    with pytest.raises(DataError, match=r"record 1, field 'img_id': image path '7\.tif' resolves outside"):
        load_rsvqa(*files, images, extensions=(".tif", ".png"))
    res = load_rsvqa(*files, images, extensions=(".tif", ".png"), on_error="skip")
    assert [r.image for r in res.records] == ["0.tif"] and res.n_skipped == 3
    assert "no image ../8" in res.skipped[1] and "3.png is unreadable" in res.skipped[2]


# ------------------------------------------------------------------------------------- GeoChat-Bench


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_geochat_referring(tmp_path):
    images = tmp_path / "images"
    _image(images / "P0001.png", (800, 600))
    one = [[80, 60], [240, 60], [240, 180], [80, 180]]  # 160x120 px = grid (10,10)-(30,30)
    two = [[400, 300], [408, 300], [408, 306], [400, 306]]  # 48 px^2: 0.01 % of the image
    path = _jsonl(
        tmp_path / "referring.jsonl",
        [
            {
                "question_id": "q1",
                "image_id": "P0001",
                "question": "the large swimming pool",
                "ground_truth": [one],
                "type": "ref",
                "dataset": "SOTA",
                "obj_ids": [3],
                "size_group": "Large",
            },
            {
                "question_id": "q2",
                "image_id": "P0001",
                "text": "the two vehicles",
                "ground_truth": [one, two],
                "type": "grounding",
                "obj_ids": [3, 4],
            },
        ],
    )
    res = load_geochat_referring(path, images)
    assert res.skipped == [] and len(res.records) == 2
    r1, r2 = res.records
    assert r1.task == "referring" and r1.image == "P0001.png"
    assert r1.first_question == "<image>\n[refer] Give me the location of <p> the large swimming pool </p>"
    assert r1.answers == ["{<10><10><30><30>}"]
    assert r1.meta["width"] == 800 and r1.meta["height"] == 600
    assert r1.meta["size"] == "large" and r1.meta["multi"] is False and r1.meta["type"] == "ref"
    assert r1.meta["polygons"] == [one]
    assert r2.first_question == "<image>\n[grounding] the two vehicles"
    assert len(parse_boxes(r2.answers[0])) == 2 and r2.meta["multi"] is True
    assert r2.meta["size"] == "medium"  # computed from the mean area: (4 % + 0.01 %) / 2 of the image
    # A model that answers the ground truth scores 1 through the exact polygons.
    items = [ReferringItem.from_meta(r.answers[0], r.meta) for r in res.records]
    assert referring_metrics(items)["acc@0.5"] == 1.0


def test_geochat_referring_bad_input(tmp_path):
    images = tmp_path / "images"
    _image(images / "train_1.png", (600, 600))
    good = {"question_id": "ok", "image_id": "train_1", "question": "a car", "ground_truth": [[0, 0, 60, 60]]}
    path = _jsonl(
        tmp_path / "referring.jsonl",
        [
            good,
            {**good, "question_id": "bad-gt", "ground_truth": [[1, 2]]},
            {**good, "question_id": "no-image", "image_id": "missing"},
            "{not json",
        ],
    )
    with pytest.raises(DataError, match=r"referring\.jsonl: record 'bad-gt', field 'ground_truth'"):
        load_geochat_referring(path, images)
    res = load_geochat_referring(path, images, on_error="skip")
    assert [r.id for r in res.records] == ["ok"] and res.n_skipped == 3
    assert any("field 'image_id'" in s for s in res.skipped)
    assert any("line 4" in s for s in res.skipped)


def test_geochat_region_captions(tmp_path):
    images = tmp_path / "images"
    _image(images / "0042.png", (64, 64))
    path = tmp_path / "region_captioning.json"
    rows = [
        {
            "question_id": 1,
            "image_id": "0042",
            "question": "{<10><20><30><40>|<15>}",
            "ground_truth": "a red car",
        },
        {
            "question_id": 2,
            "image_id": "0042",
            "question": "[identify] {<0><0><50><50>}",
            "ground_truth": ["a tennis court", "a court"],
        },
    ]
    path.write_text(json.dumps(rows))
    res = load_geochat_region_captions(path, images)
    r1, r2 = res.records
    assert r1.task == "region_caption" and r1.image == "0042.png"
    assert r1.first_question == "<image>\n[identify] What is the object present at {<10><20><30><40>|<15>}"
    assert r1.answers == ["a red car"] and r1.meta["refs"] == ["a red car"]
    assert r1.meta["boxes"] == ["{<10><20><30><40>|<15>}"]
    assert r2.first_question == "<image>\n[identify] {<0><0><50><50>}"
    assert r2.meta["refs"] == ["a tennis court", "a court"]


def test_geochat_region_captions_bad_input(tmp_path):
    images = tmp_path / "images"
    _image(images / "0042.png")
    rows = [
        {"question_id": 1, "image_id": "0042", "question": "the car", "ground_truth": "a car"},
        {"question_id": 2, "image_id": "0042", "question": "{<10><20><300><40>}", "ground_truth": "a car"},
        {"question_id": 3, "image_id": "0042", "question": "{<1><2><3><4>}", "ground_truth": ""},
    ]
    path = _jsonl(tmp_path / "region.jsonl", rows)
    with pytest.raises(DataError, match=r"record 1, field 'question': no region box"):
        load_geochat_region_captions(path, images)
    res = load_geochat_region_captions(path, images, on_error="skip")
    assert res.records == [] and res.n_skipped == 3
    assert "outside the 0-100 grid" in res.skipped[1]
    assert "field 'ground_truth'" in res.skipped[2]


def test_geochat_bench_refuses_images_outside_the_folder_and_repeated_ids(tmp_path):
    images = tmp_path / "images"
    _image(images / "P1.png", (64, 64))
    _image(tmp_path / "secret.png", (64, 64))
    _truncated_png(images / "broken.png")
    good = {"question_id": "ok", "image_id": "P1", "question": "a car", "ground_truth": [[0, 0, 6, 6]]}
    rows = [
        good,
        {**good, "question_id": "up", "image_id": "../secret"},
        {**good, "question_id": "abs", "image_id": str(tmp_path / "secret")},
        {**good, "question_id": "broken", "image_id": "broken"},
        good,  # the same question_id again
    ]
    path = _jsonl(tmp_path / "referring.jsonl", rows)
    with pytest.raises(DataError, match=r"record 'up', field 'image_id': image path '\.\./secret\.png'"):
        load_geochat_referring(path, images)
    res = load_geochat_referring(path, images, on_error="skip")
    assert [r.id for r in res.records] == ["ok"] and res.n_skipped == 4
    assert "resolves outside" in res.skipped[0] and "resolves outside" in res.skipped[1]
    assert "unreadable" in res.skipped[2] and "field 'id'" in res.skipped[3]
    captions = [{**r, "question": "{<1><2><30><40>}", "ground_truth": "a car"} for r in rows]
    res = load_geochat_region_captions(_jsonl(tmp_path / "region.jsonl", captions), images, on_error="skip")
    assert [r.id for r in res.records] == ["ok"] and res.n_skipped == 4
