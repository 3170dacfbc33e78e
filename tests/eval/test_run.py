"""evaluate_model end to end: a tiny model on a tiny prepared split, real and garbage answers, bad
images and missing evaluation sets."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from geodistill.config import BenchmarksConfig, EvalConfig, SceneSetConfig
from geodistill.data.prepare import image_root
from geodistill.data.records import parse_boxes
from geodistill.data.synthetic import EVAL_SETS
from geodistill.errors import DataError
from geodistill.eval import run
from geodistill.eval.metrics import normalize_answer
from geodistill.eval.run import evaluate_model, input_notes, load_sets, scalars
from geodistill.eval.tasks import EVAL_TASKS, HEADLINE, headline, set_metrics


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
    # Every set the generator writes is evaluated on its own (limit 2 items per set).
    assert {t: tuple(set_metrics(metrics, t)) for t in EVAL_TASKS} == EVAL_SETS
    aid = set_metrics(metrics, "scene")["aid"]
    assert {"OA", "AA", "per_class", "confusion", "rows", "cols", "n", "unparsed"} <= set(aid)
    assert {"accuracy", "n", "mOA", "OA", "n_total", "empty"} <= set(set_metrics(metrics, "vqa")["lr"])
    referring_keys = {"acc@0.5", "acc@0.25", "by_size", "by_objects", "unparsed", "n_items"}
    assert referring_keys <= set(set_metrics(metrics, "referring")["geochat"])
    captions = set_metrics(metrics, "region_caption")["geochat"]
    assert {"rouge1", "rougeL", "meteor", "n", "empty"} <= set(captions)
    # The task's headline is the mean over its sets, its items the sum.
    sets = set_metrics(metrics, "scene").values()
    assert metrics["scene"]["OA"] == sum(s["OA"] for s in sets) / 2 and metrics["scene"]["n"] == 4
    summary = {t: {n: (s["n"], s["skipped"], "note" in s) for n, s in by.items()}
               for t, by in metrics["sets"].items()}  # fmt: skip
    assert summary == {t: {n: (2, 0, False) for n in names} for t, names in EVAL_SETS.items()}
    skipped = json.loads((plots / "skipped.json").read_text())
    assert skipped == {t: {n: [] for n in names} for t, names in EVAL_SETS.items()}
    eff = metrics["efficiency"]
    assert eff["params"]["total"] > 0 and eff["flops_per_sample"] > 0 and eff["latency_s"] > 0
    assert {"tokens_per_s", "peak_memory_mb", "weights_mb", "new_tokens"} <= set(eff)
    json.dumps(metrics)  # what the stage writes must serialise

    preds = _predictions(plots)
    assert [(p["task"], p["set"]) for p in preds] == [(t, n) for t in EVAL_TASKS for n in EVAL_SETS[t]
                                                      for _ in range(2)]  # fmt: skip
    assert all({"id", "image", "question", "prediction", "reference", "meta"} <= set(p) for p in preds)
    assert all(Path(p["image"]).is_file() for p in preds)
    # The untrained model's answers are garbage: counted as unparsed, exactly as often as they fail.
    classes = {normalize_answer(c).replace(" ", "") for c in aid["rows"]}
    scene = [p["prediction"] for p in preds if p["set"] == "aid"]
    unnamed = sum(normalize_answer(a).replace(" ", "") not in classes for a in scene)
    assert aid["unparsed"] == unnamed
    refer = [p["prediction"] for p in preds if p["task"] == "referring"]
    assert set_metrics(metrics, "referring")["geochat"]["unparsed"] == sum(not parse_boxes(a) for a in refer)
    for name in EVAL_SETS["scene"]:
        with Image.open(plots / f"confusion_{name}.png") as im:
            assert im.format == "PNG"

    flat = scalars(metrics)
    assert flat["scene"]["OA"] == metrics["scene"]["OA"]
    assert "confusion" not in flat["scene"]["sets"]["aid"] and "model" not in flat
    flat_headline = headline(metrics)
    assert set(flat_headline) >= {"scene_OA", "vqa_mOA", "referring_acc@0.5", "region_caption_meteor",
                                  "scene/aid_OA", "scene/ucm_AA", "vqa/hr_mOA",
                                  "region_caption/geochat_rougeL"}  # fmt: skip
    assert flat_headline["referring_acc@0.5"] == metrics["referring"]["acc@0.5"]
    assert flat_headline["scene/ucm_OA"] == set_metrics(metrics, "scene")["ucm"]["OA"]
    assert flat["sets"]["scene"] == {"aid": {"n": 2, "skipped": 0}, "ucm": {"n": 2, "skipped": 0}}


GARBAGE = ["", "{<1><2>", "{<200><0><1><1>}{<50><50><10><10>|<720>} \x00\ufffd"]


def test_garbage_answers_are_counted_not_raised(world, shared_meteor, tmp_path, monkeypatch):
    def fake_generate(model, tok, transform, n_img, prompts, *, batch_size, max_new_tokens, **_):
        return [GARBAGE[i % len(GARBAGE)] for i in range(len(prompts))], 0.0

    monkeypatch.setattr(run, "generate", fake_generate)
    _, prepared, model = world
    cfg = EvalConfig(limit=3, batch_size=8, max_new_tokens=4, latency_samples=1)
    metrics = evaluate_model(model, "garbage", cfg, prepared, image_root(prepared), tmp_path)
    aid = set_metrics(metrics, "scene")["aid"]
    assert aid["OA"] == 0.0 and aid["unparsed"] == 3 and metrics["scene"]["OA"] == 0.0
    lr = set_metrics(metrics, "vqa")["lr"]
    assert lr["OA"] == 0.0 and lr["empty"] == 1
    g = set_metrics(metrics, "referring")["geochat"]
    # Out-of-grid and inverted boxes parse (and match nothing); the rest have no box at all.
    assert g["unparsed"] == 2 and g["n_pred"] == 2 and g["acc@0.5"] == 0.0
    caps = set_metrics(metrics, "region_caption")["geochat"]
    assert caps["empty"] == 1 and caps["n"] == 3
    assert len(_predictions(tmp_path)) == 3 * 6 and (tmp_path / "confusion_aid.png").is_file()


def test_an_oracle_scores_full_marks_on_every_set(world, shared_meteor, tmp_path, monkeypatch):
    """The reference answers parse: answering with them scores 100 % on every set's headline metrics
    (METEOR's fragmentation penalty keeps an exact match just under 1)."""
    _, prepared, model = world
    sets = load_sets(EvalConfig(), prepared, image_root(prepared))
    truth = {(str(path), rec.first_question): rec.answers[0] for ss in sets.values() for s in ss
             for rec, path in s.items}  # fmt: skip

    def oracle(model, tok, transform, n_img, prompts, **_):
        return [truth[(str(p.image), p.turns[0].value)] for p in prompts], 0.0

    monkeypatch.setattr(run, "generate", oracle)
    metrics = evaluate_model(model, "oracle", EvalConfig(latency_samples=1), prepared, image_root(prepared),
                             tmp_path)  # fmt: skip
    for h in HEADLINE:
        per_set = set_metrics(metrics, h.task)
        assert list(per_set) == list(EVAL_SETS[h.task])
        for name, section in per_set.items():
            assert section[h.metric] > (0.9 if h.metric == "meteor" else 0.9999), (h.task, name, h.metric)


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
    # Two sets of one task (the same folder twice here): each loads, and is reported, on its own.
    scene_sets = (SceneSetConfig("aid", str(aid)), SceneSetConfig("ucm", str(aid)))
    cfg = EvalConfig(limit=1, batch_size=4, max_new_tokens=2, latency_samples=1,
                     benchmarks=BenchmarksConfig(scene=scene_sets))  # fmt: skip
    monkeypatch.setattr(run, "generate", _no_generation)
    with pytest.raises(DataError, match=r"forest_2\.png', field 'image': image file .*forest_2\.png is"):
        evaluate_model(model, "tiny", cfg, prepared, image_root(prepared), tmp_path / "raise")
    sets = load_sets(cfg, prepared, image_root(prepared), on_error="skip")
    assert [s.name for s in sets["scene"]] == ["aid", "ucm"]
    for s in sets["scene"]:
        assert s.source == str(aid) and len(s.items) == 1  # limit 1 of the 2 good ones
        assert len(s.skipped) == 1 and "forest_2.png" in s.skipped[0]
    assert [s.name for s in sets["vqa"]] == ["lr", "hr"]  # tasks without a benchmark: the prepared sets


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
    # The truncated image is the first scene set's; its item is skipped there and nowhere else.
    skipped = json.loads((plots / "skipped.json").read_text())
    assert first["meta"]["set"] == "aid" and len(skipped["scene"]["aid"]) == 1
    assert first["image"] in skipped["scene"]["aid"][0]
    assert metrics["sets"]["scene"]["aid"]["skipped"] == 1 and metrics["sets"]["scene"]["ucm"]["skipped"] == 0
    assert sum(len(v) for by in skipped.values() for v in by.values()) == 1
    assert any("scene/aid: 1 bad item(s)" in line for line in input_notes(metrics))


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
    assert "set eval.benchmarks.scene" in notes[0] and "test.jsonl holds none" in notes[0]
    assert "eval.benchmarks.region_caption" in notes[3]

