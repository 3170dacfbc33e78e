"""evaluate_model end to end: a tiny model on a tiny prepared split, real and garbage answers, bad
images and missing evaluation sets."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from geodistill.config import BenchmarksConfig, EvalConfig
from geodistill.data.prepare import image_root
from geodistill.data.records import parse_boxes
from geodistill.errors import DataError
from geodistill.eval import run
from geodistill.eval.metrics import normalize_answer
from geodistill.eval.run import evaluate_model, input_notes, load_sets, scalars
from geodistill.eval.tasks import EVAL_TASKS, headline


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_arch, make_world):
    """(root, prepared folder, model folder): 3 synthetic test images and a random tiny model."""
    root = tmp_path_factory.mktemp("run")
    prepared, models = make_world(root, 32, [("model", tiny_arch())])
    return root, prepared, models["model"]


@pytest.fixture
def shared_meteor(meteor, monkeypatch):
    monkeypatch.setattr(run, "caption_metrics", functools.partial(run.caption_metrics, meteor=meteor))


def _predictions(plots: Path) -> list[dict]:
    return [json.loads(line) for line in (plots / "predictions.jsonl").read_text().splitlines()]


def test_evaluate_model_end_to_end(world, shared_meteor, tmp_path):
    _, prepared, model = world
    cfg = EvalConfig(limit=2, batch_size=4, max_new_tokens=6, latency_samples=1)
    plots = tmp_path / "plots"
    metrics = evaluate_model(model, "tiny", cfg, prepared, image_root(prepared), plots)
    assert metrics["model"] == "tiny" and metrics["split"] == "test"
    assert {"scene", "vqa", "referring", "region_caption", "efficiency", "eval_seconds"} <= set(metrics)
    assert {"OA", "AA", "per_class", "confusion", "rows", "cols", "n", "unparsed"} <= set(metrics["scene"])
    assert {"accuracy", "n", "mOA", "OA", "n_total", "empty"} <= set(metrics["vqa"])
    referring_keys = {"acc@0.5", "acc@0.25", "by_size", "by_objects", "unparsed", "n_items"}
    assert referring_keys <= set(metrics["referring"])
    assert {"rouge1", "rougeL", "meteor", "n", "empty"} <= set(metrics["region_caption"])
    assert {t: (s["n"], s["skipped"], "note" in s) for t, s in metrics["sets"].items()} == {
        t: (2, 0, False) for t in EVAL_TASKS
    }
    assert json.loads((plots / "skipped.json").read_text()) == {t: [] for t in EVAL_TASKS}
    eff = metrics["efficiency"]
    assert eff["params"]["total"] > 0 and eff["flops_per_sample"] > 0 and eff["latency_s"] > 0
    assert {"tokens_per_s", "peak_memory_mb", "weights_mb", "new_tokens"} <= set(eff)
    json.dumps(metrics)  # what the stage writes must serialise

    preds = _predictions(plots)
    assert [p["task"] for p in preds] == [t for t in EVAL_TASKS for _ in range(2)]
    assert all({"id", "image", "question", "prediction", "reference", "meta"} <= set(p) for p in preds)
    assert all(Path(p["image"]).is_file() for p in preds)
    # The untrained model's answers are garbage: counted as unparsed, exactly as often as they fail.
    classes = {c.replace(" ", "") for c in metrics["scene"]["rows"]}
    scene = [p["prediction"] for p in preds if p["task"] == "scene"]
    unnamed = sum(normalize_answer(a).replace(" ", "") not in classes for a in scene)
    assert metrics["scene"]["unparsed"] == unnamed
    refer = [p["prediction"] for p in preds if p["task"] == "referring"]
    assert metrics["referring"]["unparsed"] == sum(not parse_boxes(a) for a in refer)
    with Image.open(plots / "confusion.png") as im:
        assert im.format == "PNG"

    flat = scalars(metrics)
    assert flat["scene"]["OA"] == metrics["scene"]["OA"]
    assert "confusion" not in flat["scene"] and "rows" not in flat["scene"] and "model" not in flat
    flat_headline = headline(metrics)
    assert set(flat_headline) >= {"scene_OA", "vqa_mOA", "referring_acc@0.5", "region_caption_meteor"}
    assert flat_headline["referring_acc@0.5"] == metrics["referring"]["acc@0.5"]
    assert flat["sets"]["scene"] == {"n": 2, "skipped": 0}


GARBAGE = ["", "{<1><2>", "{<200><0><1><1>}{<50><50><10><10>|<720>} \x00\ufffd"]


def test_garbage_answers_are_counted_not_raised(world, shared_meteor, tmp_path, monkeypatch):
    def fake_generate(model, tok, transform, n_img, prompts, *, batch_size, max_new_tokens, **_):
        return [GARBAGE[i % len(GARBAGE)] for i in range(len(prompts))], 0.0

    monkeypatch.setattr(run, "generate", fake_generate)
    _, prepared, model = world
    cfg = EvalConfig(limit=3, batch_size=8, max_new_tokens=4, latency_samples=1)
    metrics = evaluate_model(model, "garbage", cfg, prepared, image_root(prepared), tmp_path)
    assert metrics["scene"]["OA"] == 0.0 and metrics["scene"]["unparsed"] == 3
    assert metrics["vqa"]["OA"] == 0.0 and metrics["vqa"]["empty"] == 1
    g = metrics["referring"]
    # Out-of-grid and inverted boxes parse (and match nothing); the rest have no box at all.
    assert g["unparsed"] == 2 and g["n_pred"] == 2 and g["acc@0.5"] == 0.0
    assert metrics["region_caption"]["empty"] == 1 and metrics["region_caption"]["n"] == 3
    assert len(_predictions(tmp_path)) == 12 and (tmp_path / "confusion.png").is_file()


def test_scalars_drops_lists_strings_and_empties():
    d = {"a": [1, 2], "b": {"c": (1,), "d": 2.0, "e": None, "f": "x", "g": {}}, "h": True, "i": 3}
    assert scalars(d) == {"b": {"d": 2.0}, "i": 3}
    assert scalars({"x": {"y": [0.5]}}) == {}


def _truncate(path: Path) -> None:
    """Keep a PNG's header (it opens) but cut its pixel data (it does not decode)."""
    Image.effect_noise((64, 64), 50).convert("RGB").save(path, format="PNG")
    path.write_bytes(path.read_bytes()[:300])


def _no_generation(*_a, **_k):
    raise AssertionError("bad input must be found when the set is loaded, before any generation")


def test_truncated_benchmark_image_is_named_before_generation_or_counted(world, tmp_path, monkeypatch):
    """A real scene folder (AID layout) with one truncated PNG: a DataError naming the file when the set
    is loaded, not a PIL traceback mid-generation; under skip, a counted skip listed in skipped.json."""
    _, prepared, model = world
    aid = tmp_path / "AID"
    for cls in ("Airport", "Forest"):
        (aid / cls).mkdir(parents=True)
        Image.new("RGB", (40, 40), (90, 90, 90)).save(aid / cls / f"{cls.lower()}_1.png")
    _truncate(aid / "Forest" / "forest_2.png")
    cfg = EvalConfig(limit=1, batch_size=4, max_new_tokens=2, latency_samples=1,
                     benchmarks=BenchmarksConfig(scene_dir=str(aid)))  # fmt: skip
    monkeypatch.setattr(run, "generate", _no_generation)
    with pytest.raises(DataError, match=r"forest_2\.png', field 'image': image file .*forest_2\.png is"):
        evaluate_model(model, "tiny", cfg, prepared, image_root(prepared), tmp_path / "raise")
    sets = load_sets(cfg, prepared, image_root(prepared), on_error="skip")
    assert sets["scene"].source == str(aid) and len(sets["scene"].items) == 1  # limit 1 of the 2 good ones
    assert len(sets["scene"].skipped) == 1 and "forest_2.png" in sets["scene"].skipped[0]


def test_bad_prepared_image_is_skipped_and_listed(world, tmp_path, monkeypatch, shared_meteor):
    _, prepared, model = world
    copy = tmp_path / "prepared"
    shutil.copytree(prepared, copy)
    first = json.loads((copy / "test.jsonl").read_text().splitlines()[0])
    _truncate(copy / first["image"])
    cfg = EvalConfig(limit=2, batch_size=8, max_new_tokens=2, latency_samples=1)
    with pytest.raises(DataError, match=rf"test\.jsonl: record '{first['id']}', field 'image'"):
        load_sets(cfg, copy, image_root(copy))

    def fake_generate(model, tok, transform, n_img, prompts, **_):
        return ["no"] * len(prompts), 0.0

    monkeypatch.setattr(run, "generate", fake_generate)
    plots = tmp_path / "plots"
    metrics = evaluate_model(model, "tiny", cfg, copy, image_root(copy), plots, on_error="skip")
    # Every record of the truncated image is skipped: one per task (its VQA questions too).
    skipped = json.loads((plots / "skipped.json").read_text())
    assert all(metrics["sets"][t]["skipped"] == len(skipped[t]) >= 1 for t in EVAL_TASKS)
    assert all(first["image"] in m for t in EVAL_TASKS for m in skipped[t])
    assert any("bad item(s)" in line for line in input_notes(metrics))


def test_no_evaluation_set_says_which_param_gives_one(world, tmp_path):
    """Real training data: the prepared test split is empty and no benchmark is configured."""
    _, prepared, model = world
    empty = tmp_path / "prepared"
    shutil.copytree(prepared, empty)
    (empty / "test.jsonl").write_text("")
    metrics = evaluate_model(model, "tiny", EvalConfig(), empty, image_root(empty), tmp_path / "plots")
    assert not set(EVAL_TASKS) & set(metrics) and "efficiency" not in metrics
    notes = input_notes(metrics)
    assert len(notes) == 4 and all(n.startswith("no evaluation set: ") for n in notes)
    assert "set eval.benchmarks.scene_dir" in notes[0] and "test.jsonl holds none" in notes[0]
    assert "eval.benchmarks.region_caption_json" in notes[3]

