import io
import re

import numpy as np
from PIL import Image

from geodistill.data import synthetic
from geodistill.data.records import parse_boxes, parse_record
from geodistill.eval.metrics import _class_key


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


def _eval_records(content_id: str, seed: int = 0, scene: str | None = None):
    rng = np.random.default_rng(0)
    if scene is not None:  # the scene class is drawn from the content id; find one of the wanted class
        candidates = (f"{content_id}{i}" for i in range(200))
        content_id = next(c for c in candidates if synthetic.make_scene(c, seed, 64, 4).scene == scene)
    return synthetic.eval_scenes(content_id, seed, 64, 4, rng)


def test_eval_sets_carry_ground_truth():
    views = _eval_records("t", scene="harbor")
    recs = [r for _, rs in views for r in rs]
    for r in recs:
        assert parse_record(r.to_dict(), source="gen", index=0) == r
    by_task: dict[str, set[str]] = {}
    for r in recs:
        by_task.setdefault(r.task, set()).add(r.meta["set"])
    assert by_task == {t: set(names) for t, names in synthetic.EVAL_SETS.items()}
    for r in recs:
        if r.task == "scene":
            assert r.meta["label"] == synthetic.SCENE_SETS[r.meta["set"]].names["harbor"] == r.answers[0]
            assert r.meta["label"] in r.meta["classes"] and ", ".join(r.meta["classes"]) in r.first_question
        if r.task == "referring":
            assert [b.to_text() for b in parse_boxes(r.answers[0])] == r.meta["boxes"]
        if r.task == "region_caption":
            assert r.answers[0] == r.meta["refs"][0] and len(set(r.meta["refs"])) == 2
    for name, (rendering, qtypes) in synthetic.VQA_SETS.items():
        view = next(v for v, rs in views if rs[0].meta.get("set") == name)
        assert view.rendering == rendering and view.image_id.endswith(f"_{name}")
        assert [r.meta["qtype"] for r in recs if r.task == "vqa" and r.meta["set"] == name] == list(qtypes)


def test_every_eval_set_is_deterministic_from_seed():
    a, b, c = _eval_records("d"), _eval_records("d"), _eval_records("d", seed=1)
    assert [(v.image_png, rs) for v, rs in a] == [(v.image_png, rs) for v, rs in b]
    assert all(va.image_png != vc.image_png for (va, _), (vc, _) in zip(a, c, strict=True))
    # Every rendering of one content id shows the same ground: the same objects, only the sensor differs.
    assert len({(v.scene, v.objects) for v, _ in a}) == 1


def _pixels(scene) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(scene.image_png)).convert("RGB")).astype(float)


def test_zero_shot_renderings_differ_from_training():
    """The AID-like (hazy) and UCM-like (tinted) sets are rendered as no training image is, measurably;
    LR-like images really have half the resolution."""
    ids = [f"s{i}" for i in range(40)]
    assert {synthetic.train_rendering(i, 0) for i in ids} == {"plain", "low_res"}  # never hazy or tinted
    stats = {}
    for rendering in synthetic.RENDERINGS:
        px = [_pixels(synthetic.make_scene(i, 0, 64, 4, rendering=rendering)) for i in ids]
        stats[rendering] = {
            "mean": np.mean([p.mean() for p in px]),
            "contrast": np.mean([p.std() for p in px]),
            "red_over_blue": np.mean([p[..., 0].mean() / max(p[..., 2].mean(), 1) for p in px]),
            # half resolution: every 2x2 block is one value, so no detail inside a block
            "in_block_detail": np.mean([np.abs(p[:, 0::2] - p[:, 1::2]).mean() for p in px]),
        }
    plain = stats["plain"]
    assert stats["hazy"]["contrast"] < 0.8 * plain["contrast"] and stats["hazy"]["mean"] > plain["mean"] + 20
    assert stats["tinted"]["red_over_blue"] > 1.25 * plain["red_over_blue"]
    assert stats["low_res"]["in_block_detail"] == 0 < plain["in_block_detail"]


def test_zero_shot_class_wording_differs_from_training():
    """Scene sets name classes in their benchmark's style (AID: words hyphenated, UCM: words run
    together), in a class list no training prompt uses; each name is still a training wording once
    normalised, and in lower case: the tokenizer is built from training text, where class names never
    start with a capital, and a name it can only spell letter by letter is one no model can copy."""
    rng = np.random.default_rng(0)
    train_lists = set()
    train_answers = set()
    for i in range(300):
        _, a, listed = synthetic.scene_question(synthetic.make_scene(f"w{i}", 0, 64, 4), rng)
        train_lists.add(tuple(listed))
        train_answers.add(a)
    wordings = {_class_key(w) for names in synthetic.SCENE_NAMES.values() for w in names}
    for name, s in synthetic.SCENE_SETS.items():
        _, _, classes = synthetic.scene_set_question(synthetic.make_scene("w0", 0, 64, 4), name)
        assert tuple(classes) not in train_lists
        assert not set(s.names.values()) <= train_answers  # written differently from every training answer
        assert {_class_key(n) for n in s.names.values()} <= wordings
        assert all(c == c.lower() for c in classes)
    # In training the answer is the wording the prompt lists, and both wordings of a class occur.
    assert all(w in train_answers for names in synthetic.SCENE_NAMES.values() for w in names)


def test_region_captions_vary_in_order_wording_and_relations():
    rng = np.random.default_rng(0)
    captions = []
    for i in range(60):
        sc = synthetic.make_scene(f"r{i}", 0, 64, 4)
        for o in sc.objects:
            templates = range(synthetic.N_CAPTION_TEMPLATES)
            captions += [synthetic.region_caption(o, sc, 4, t, rng) for t in templates]
    text = " ".join(captions)
    for word in ("plane", "aircraft", "vessel", "oil tank", "big", "little", "to the left of", "above",
                 "in the top", "one of"):  # fmt: skip
        assert word in text, word
    first_words = {c.split()[0] for c in captions}
    assert {"a", "an", "the", "one"} <= first_words  # word order differs, not only the words


def test_relation_to_the_nearest_object_is_true():
    a = synthetic.SceneObject("ship", "red", "medium", 0, 0, 1, 2, 0)
    b = synthetic.SceneObject("vehicle", "blue", "small", 3, 0, 1, 1, 0)
    c = synthetic.SceneObject("vehicle", "white", "small", 0, 3, 1, 1, 0)
    sc = synthetic.Scene("x", "harbor", (a, b, c), b"", 64)
    rng = np.random.default_rng(0)
    # Ties in distance go to the upper object: c (same row) rather than b.
    assert re.fullmatch(r"a red (ship|boat|vessel) to the left of a white vehicle",
                        synthetic.region_caption(a, sc, 4, 2, rng))  # fmt: skip
    assert synthetic.region_caption(b, sc, 4, 2, rng).endswith("below a red ship")


def test_generated_text_uses_the_right_article():
    rng = np.random.default_rng(0)
    texts = []
    for i in range(80):
        sc = synthetic.make_scene(f"g{i}", 0, 64, 4)
        recs = synthetic.train_records(sc, 4, rng) + [r for _, rs in _eval_records(f"g{i}") for r in rs]
        texts += [t.value for r in recs for t in r.conversations]
    bad = [t for t in texts if re.search(r"\ba [aeiou]", t, re.IGNORECASE)]
    assert not bad, bad[:3]
    assert any("an airport area" in t for t in texts)


def test_count_answers_are_not_a_majority_task():
    rng = np.random.default_rng(0)
    answers: dict[str, list[str]] = {"lr": [], "hr": []}
    for i in range(200):
        sc = synthetic.make_scene(f"c{i}", 0, 64, 4)
        answers["lr"] += [a for qt, _, a in synthetic._vqa_lr(sc, rng) if qt == "count"]
        answers["hr"] += [a for qt, _, a in synthetic._vqa_hr(sc, 4, rng) if qt == "count"]
    for name, xs in answers.items():
        top = max(xs.count(a) for a in set(xs)) / len(xs)
        assert top < 0.45, f"{name}: majority count answer covers {top:.0%}"


def test_yes_no_answers_are_balanced():
    rng = np.random.default_rng(0)
    yes: dict[tuple[str, str], list[bool]] = {}
    for i in range(200):
        sc = synthetic.make_scene(f"y{i}", 0, 64, 4)
        for name, qs in (("lr", synthetic._vqa_lr(sc, rng)), ("hr", synthetic._vqa_hr(sc, 4, rng))):
            for qt, _, a in qs:
                if a in ("yes", "no"):
                    yes.setdefault((name, qt), []).append(a == "yes")
    for key, xs in yes.items():
        assert 0.2 < sum(xs) / len(xs) < 0.8, (key, sum(xs) / len(xs))


def test_every_vqa_question_type_opens_a_training_conversation():
    # Evaluation asks each type alone; a type that only ever followed another in training was answered by
    # its position (the teacher answered "rural or urban?" with a count).
    starts = {
        "low_res": ("Is there", "Are there more", "How many", "Is this a rural"),
        "plain": ("Is there", ("Is the number", "Are there fewer"), "How many objects lie"),
    }
    rng = np.random.default_rng(0)
    for rendering, types in starts.items():
        firsts = []
        for i in range(40):
            sc = synthetic.make_scene(f"v{i}", 0, 64, 4, rendering=rendering)
            recs = synthetic.train_records(sc, 4, rng)
            firsts += [r.first_question.removeprefix("<image>\n") for r in recs if r.task == "vqa"]
        for prefix in types:
            assert any(q.startswith(prefix) for q in firsts), (rendering, prefix)


def test_one_object_scene_is_deterministic_and_draws_its_object_in_its_cell():
    cells = set()
    for i in range(40):
        sc = synthetic.one_object_scene(f"o{i}", 0, 64, 4)
        assert sc == synthetic.one_object_scene(f"o{i}", 0, 64, 4)
        (o,) = sc.objects
        assert (o.rows, o.cols) == (1, 1) and not o.box(4).problems()
        arr = np.asarray(Image.open(io.BytesIO(sc.image_png)).convert("RGB")).astype(int)
        hits = np.argwhere(np.abs(arr - np.array(synthetic.COLOURS[o.colour])).sum(-1) == 0)
        assert len(hits) and {(r // 16, c // 16) for r, c in hits} == {(o.row, o.col)}
        cells.add((o.row, o.col))
    assert len(cells) >= 10  # the cell varies over scenes
