import io

import numpy as np
from PIL import Image

from geodistill.data import synthetic
from geodistill.data.records import parse_boxes, parse_record


def test_scene_is_deterministic_from_seed():
    a = synthetic.make_scene("train000001", 3, 64, 8)
    b = synthetic.make_scene("train000001", 3, 64, 8)
    c = synthetic.make_scene("train000001", 4, 64, 8)
    assert a == b
    assert a.image_png != c.image_png


def test_every_scene_class_renders_and_objects_are_on_the_grid():
    for i, name in enumerate(synthetic.SCENES):
        sc = synthetic.make_scene(f"x{i}", 0, 64, 8, scene=name)
        img = Image.open(io.BytesIO(sc.image_png))
        assert img.size == (64, 64)
        for o in sc.objects:
            assert not o.box(8).problems()
            assert o.category in synthetic.SCENE_OBJECTS[name]
        for cat, (_lo, hi) in synthetic.SCENE_OBJECTS[name].items():
            assert sc.count(cat) <= hi


def test_object_pixels_are_drawn_inside_their_box():
    sc = synthetic.make_scene("y", 1, 64, 8, scene="airport")
    arr = np.asarray(Image.open(io.BytesIO(sc.image_png)).convert("RGB")).astype(int)
    for o in sc.objects:
        colour = np.array(synthetic.COLOURS[o.colour])
        hits = np.argwhere(np.abs(arr - colour).sum(-1) == 0)
        cell = 8
        inside = [
            (o.row * cell <= r < (o.row + o.rows) * cell) and (o.col * cell <= c < (o.col + o.cols) * cell)
            for r, c in hits
        ]
        assert any(inside)


def test_records_cover_all_tasks_and_validate():
    rng = np.random.default_rng(0)
    tasks = set()
    for i in range(30):
        sc = synthetic.make_scene(f"z{i}", 0, 64, 8)
        for r in synthetic.train_records(sc, 8, rng):
            assert parse_record(r.to_dict(), source="gen", index=0) == r
            tasks.add(r.task)
    assert tasks == {
        "scene",
        "vqa",
        "description",
        "conversation",
        "complex",
        "grounding_description",
        "region_caption",
        "referring",
    }


def test_test_records_carry_ground_truth():
    rng = np.random.default_rng(0)
    sc = synthetic.make_scene("t", 0, 64, 8, scene="harbor")
    recs = {r.task: r for r in synthetic.test_records(sc, 8, rng)}
    assert recs["scene"].meta["label"] == "harbor"
    ref = recs["referring"]
    assert [b.to_text() for b in parse_boxes(ref.answers[0])] == ref.meta["boxes"]
    assert recs["region_caption"].answers[0] in recs["region_caption"].meta["refs"]
    qtypes = {r.meta["qtype"] for r in synthetic.test_records(sc, 8, rng) if r.task == "vqa"}
    assert qtypes == set(synthetic.QTYPES)


def test_count_answers_are_not_a_majority_task():
    rng = np.random.default_rng(0)
    answers = []
    for i in range(200):
        sc = synthetic.make_scene(f"c{i}", 0, 64, 8)
        answers += [a for qt, _, a in synthetic._vqa(sc, rng) if qt == "count"]
    top = max(answers.count(a) for a in set(answers)) / len(answers)
    assert top < 0.4, f"majority count answer covers {top:.0%}"
