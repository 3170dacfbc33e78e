"""evaluate_model end to end: a tiny model on a tiny prepared split, real and garbage answers."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from PIL import Image

from geodistill.config import DataConfig, EvalConfig, LlavaArch, SyntheticConfig
from geodistill.data.prepare import image_root, prepare
from geodistill.data.records import parse_boxes
from geodistill.data.template import SYSTEM
from geodistill.eval import run
from geodistill.eval.metrics import MeteorScorer, normalize_answer
from geodistill.eval.run import EVAL_TASKS, evaluate_model, headline, scalars
from geodistill.models.checkpoints import save_llava
from geodistill.models.llava import build_llava
from geodistill.models.tokenizer import build_tokenizer
from geodistill.models.transform import ImageTransform

ARCH = LlavaArch(
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    num_kv_heads=2,
    vision_hidden_size=32,
    vision_intermediate_size=64,
    vision_layers=3,
    vision_heads=2,
    image_size=32,
    patch_size=8,
    max_position_embeddings=512,
)
TASK_KEYS = {"scene": "scene", "vqa": "vqa", "referring": "grounding", "region_caption": "captioning"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(root, prepared folder, model folder): 3 synthetic test images and a random tiny model."""
    root = tmp_path_factory.mktemp("run")
    prepared = root / "prepared"
    synthetic = SyntheticConfig(image_size=32, grid=4, train_images=1, val_images=1, test_images=3,
                                pretrain_texts=2)  # fmt: skip
    prepare(DataConfig(synthetic=synthetic), prepared)
    texts = [SYSTEM]
    for split in ("train", "test"):
        for line in (prepared / f"{split}.jsonl").read_text().splitlines():
            texts += [t["value"] for t in json.loads(line)["conversations"]]
    tok = build_tokenizer(texts, 400)
    save_llava(build_llava(ARCH, tok, seed=0), tok, ImageTransform(ARCH.image_size), root / "model")
    return root, prepared, root / "model"


@pytest.fixture(scope="module")
def meteor():
    """One METEOR JVM (~7 s to start) shared by every evaluation in this module."""
    with MeteorScorer(timeout_s=120) as m:
        yield m


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
    assert {"scene", "vqa", "grounding", "captioning", "efficiency", "eval_seconds"} <= set(metrics)
    assert {"OA", "AA", "per_class", "confusion", "rows", "cols", "n", "unparsed"} <= set(metrics["scene"])
    assert {"accuracy", "n", "mOA", "OA", "n_total", "empty"} <= set(metrics["vqa"])
    grounding_keys = {"acc@0.5", "acc@0.25", "by_size", "by_objects", "unparsed", "n_items"}
    assert grounding_keys <= set(metrics["grounding"])
    assert {"rouge1", "rougeL", "meteor", "n", "empty"} <= set(metrics["captioning"])
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
    assert metrics["grounding"]["unparsed"] == sum(not parse_boxes(a) for a in refer)
    with Image.open(plots / "confusion.png") as im:
        assert im.format == "PNG"

    flat = scalars(metrics)
    assert flat["scene"]["OA"] == metrics["scene"]["OA"]
    assert "confusion" not in flat["scene"] and "rows" not in flat["scene"] and "model" not in flat
    assert set(headline(metrics)) >= {"scene_OA", "vqa_mOA", "grounding_acc@0.5", "caption_meteor"}


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
    g = metrics["grounding"]
    # Out-of-grid and inverted boxes parse (and match nothing); the rest have no box at all.
    assert g["unparsed"] == 2 and g["n_pred"] == 2 and g["acc@0.5"] == 0.0
    assert metrics["captioning"]["empty"] == 1 and metrics["captioning"]["n"] == 3
    assert len(_predictions(tmp_path)) == 12 and (tmp_path / "confusion.png").is_file()


def test_scalars_drops_lists_strings_and_empties():
    d = {"a": [1, 2], "b": {"c": (1,), "d": 2.0, "e": None, "f": "x", "g": {}}, "h": True, "i": 3}
    assert scalars(d) == {"b": {"d": 2.0}, "i": 3}
    assert scalars({"x": {"y": [0.5]}}) == {}
