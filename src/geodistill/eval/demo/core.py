"""The demo without its web page: checks of what a user sends, held-out test items with ground truth, the
models loaded once, and their answers side by side (boxes drawn as ``geodistill chat`` draws them,
latency, tokens/s, and IoU / correctness where the item has ground truth).

Nothing here imports Gradio, so all of it is tested without a browser.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerBase

from geodistill.data.prepare import image_root
from geodistill.data.records import (
    GROUNDING_PROMPT,
    IDENTIFY_PROMPT,
    IMAGE_PLACEHOLDER,
    REFER_PROMPT,
    SCENE_PROMPT,
    VQA_SUFFIX,
    Record,
    Turn,
    parse_boxes,
    parse_phrases,
)
from geodistill.data.shards import read_jsonl_records
from geodistill.errors import DataError, GeodistillError, ModelError
from geodistill.eval import chat
from geodistill.eval.metrics import (
    ReferringItem,
    classification_metrics,
    iou_matrix,
    referring_metrics,
    vqa_metrics,
)
from geodistill.files import open_image
from geodistill.models.checkpoints import load_for_inference
from geodistill.models.transform import ImageTransform

MAX_PIXELS = 4096 * 4096
"""Largest upload in pixels (width x height, ~16.8 MP): the models see ~0.1-0.25 MP anyway, and decoding
a far larger image would hold the server for seconds and hundreds of MB."""
MAX_NEW_TOKENS = 128
"""Longest answer by default (a grounded description with several boxes fits)."""
DISPLAY_SIDE = 1024
"""Images are shown at most this large; boxes are on a 0-100 grid, so drawing on the smaller copy is exact."""
MAX_TEST_ITEMS = 1000
"""Held-out items offered in the picker (the first ones of test.jsonl)."""
IOU_THRESHOLD = 0.5
"""A referring answer is correct when every ground-truth box is matched at this IoU (acc@0.5)."""


# ------------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class DemoModel:
    """One model, loaded once at start-up."""

    name: str
    folder: Path
    model: LlavaForConditionalGeneration
    tok: PreTrainedTokenizerBase
    transform: ImageTransform


def parse_model_spec(spec: str) -> tuple[str, Path]:
    """``NAME=DIR`` -> (NAME, DIR); a bare DIR is named after its folder."""
    name, sep, folder = spec.partition("=")
    if not sep:
        name, folder = Path(spec).name, spec
    if not name.strip() or not folder.strip():
        raise GeodistillError(f"--model {spec!r}: expected NAME=DIR, e.g. distilled=models/student_kd")
    return name.strip(), Path(folder.strip())


def check_model_folders(specs: Sequence[tuple[str, Path]]) -> None:
    """Every problem with the model list in one error (before any slow load): no model, a name given
    twice, folders that do not exist."""
    if not specs:
        raise ModelError("no model to show; pass --model NAME=DIR (a pipeline model or a LLaVA checkpoint)")
    problems = []
    names = [n for n, _ in specs]
    problems += [f"the name {n!r} is given twice" for n in sorted({n for n in names if names.count(n) > 1})]
    problems += [f"{n}: {d} does not exist" for n, d in specs if not d.exists()]
    if problems:
        raise ModelError(
            "cannot start the demo: " + "; ".join(problems) + ". Run `dvc repro` to build the pipeline's "
            "models, or pass --model NAME=DIR for each model folder to show"
        )


def load_models(specs: Sequence[tuple[str, Path]]) -> list[DemoModel]:
    """Check all folders, then load each model once (on the GPU when there is one)."""
    check_model_folders(specs)
    # The one call site of the inference loader.
    return [DemoModel(name, folder, *load_for_inference(folder)) for name, folder in specs]


# ------------------------------------------------------------------------------------------- user input


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The uploaded file as RGB; not an image, truncated, or over ``max_pixels`` is a DataError."""
    p = Path(path)
    try:
        with Image.open(p) as im:  # reads the header only: the size is known before any decoding
            width, height = im.size
    except Image.DecompressionBombError as e:
        raise DataError(f"{p.name}: too large to decode safely ({e}); upload a smaller image") from e
    except Exception as e:  # PIL raises many types for files it cannot identify; all mean "not an image"
        raise DataError(f"{p.name}: not an image ({type(e).__name__}); upload a PNG, JPEG, TIFF, BMP") from e
    if width * height > max_pixels:
        raise DataError(
            f"{p.name}: {width} x {height} = {width * height:,} pixels is over the limit of {max_pixels:,}; "
            "upload a smaller image (or start the demo with a larger --max-pixels)"
        )
    try:
        return open_image(p)  # decodes all of it: a truncated file fails here
    except DataError as e:
        raise DataError(f"{p.name}: the image cannot be decoded (truncated or corrupt?): {e}") from e


def question_turn(question: str | None) -> Turn:
    """The first human turn of ``question``; empty, or more than one ``<image>``, is a GeodistillError."""
    if not (question or "").strip():
        raise GeodistillError("the question is empty: type one, or pick a task to start from its template")
    return Turn("human", chat.prepare_question(question or ""))


def display_copy(picture: Image.Image) -> Image.Image:
    """``picture`` shrunk to at most DISPLAY_SIDE per side (a copy)."""
    shown = picture.copy()
    shown.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE))
    return shown


# ------------------------------------------------------------------------------------- held-out test items


@dataclass(frozen=True)
class TestItem:
    """One held-out question with its image; ground truth in ``record.meta`` and its gpt answer."""

    __test__ = False  # not a pytest class

    record: Record
    image: Path

    @property
    def question(self) -> str:
        """The question as a user types it (without ``<image>``)."""
        return self.record.first_question.replace(IMAGE_PLACEHOLDER, "").strip()

    @property
    def label(self) -> str:
        q = self.question.replace("\n", " ")
        return f"{self.record.id} · {self.record.task} · {q[:70]}{'…' if len(q) > 70 else ''}"


def load_test_items(prepared: Path, limit: int = MAX_TEST_ITEMS) -> list[TestItem]:
    """The first ``limit`` records of ``prepared/test.jsonl`` with their image paths."""
    split = prepared / "test.jsonl"
    if not split.is_file():
        raise DataError(f"{split} not found; run `dvc repro prepare` or pass --test-data a prepared folder")
    root = image_root(prepared)
    items = []
    for rec in read_jsonl_records(split):
        items.append(TestItem(rec, root / rec.image))
        if len(items) >= limit:
            break
    return items


def truth_for(item: TestItem | None, question: str) -> Record | None:
    """The item's record when ``question`` is still its question (an edited question has no ground truth)."""
    if item is None or question.replace(IMAGE_PLACEHOLDER, "").strip() != item.question:
        return None
    return item.record


#: Tasks offered in the page: (task of the test records whose question is the template, fallback template).
TASKS: dict[str, tuple[str, str]] = {
    "scene classification": ("scene", SCENE_PROMPT),
    "VQA": ("vqa", f"Is there a ship in the image? {VQA_SUFFIX}"),
    "grounding": ("grounding_description", GROUNDING_PROMPT.format(q="Describe the image in detail.")),
    "referring": ("referring", REFER_PROMPT.format(q="the ship")),
    "region caption": ("region_caption", IDENTIFY_PROMPT.format(q="{<25><25><75><75>}")),
    "free text": ("", ""),
}


def task_templates(items: Sequence[TestItem]) -> dict[str, str]:
    """Question template per task: the first test item's question of that task (the form the pipeline's
    models were trained on), else GeoChat's evaluation prompt with an example filled in."""
    classes = next((i.record.meta["classes"] for i in items if "classes" in i.record.meta), None)
    out = {}
    for label, (task, fallback) in TASKS.items():
        first = next((i.question for i in items if i.record.task == task), None)
        out[label] = first or fallback.replace("{classes}", ", ".join(classes or ["class 1", "class 2"]))
    return out


# ------------------------------------------------------------------------------------------------ answers


@dataclass(frozen=True)
class Score:
    correct: bool | None
    """None where a single answer has no right/wrong (captions: compare with the references)."""
    text: str


def _grounding_score(record: Record, answer: str) -> Score:
    item = ReferringItem.from_meta(answer, record.meta)
    w, h = item.width, item.height
    gt = item.gt_polygons if item.gt_polygons is not None else [b.polygon(w, h) for b in item.gt]
    pred = [b.polygon(w, h) for b in parse_boxes(answer)]
    m = iou_matrix(pred, gt)  # [pred][gt]
    ious = [max((row[j] for row in m), default=0.0) for j in range(len(gt))]  # best IoU per gt box
    matched = referring_metrics([item], thresholds=(IOU_THRESHOLD,))[f"acc@{IOU_THRESHOLD:g}"] or 0.0
    n_matched = round(matched * len(gt))
    text = (f"IoU {', '.join(f'{x:.2f}' for x in ious)} · {n_matched}/{len(gt)} boxes at IoU ≥ "
            f"{IOU_THRESHOLD:g}" + ("" if pred else " (no box in the answer)"))  # fmt: skip
    return Score(bool(gt) and n_matched == len(gt), text)


def score(record: Record | None, answer: str) -> Score | None:
    """How ``answer`` fares against the ground truth, with the evaluation's own metrics; None without any."""
    if record is None:
        return None
    meta, task = record.meta, record.task
    try:
        if task == "scene" and "label" in meta and "classes" in meta:
            ok = classification_metrics([answer], [meta["label"]], list(meta["classes"]))["OA"] == 1.0
            return Score(ok, "correct" if ok else f"wrong (truth: {meta['label']})")
        if task == "vqa" and "qtype" in meta:
            ok = vqa_metrics([answer], [record.answers[0]], [meta["qtype"]])["OA"] == 1.0
            return Score(ok, "correct" if ok else f"wrong (truth: {record.answers[0]})")
        if task == "referring" and "boxes" in meta:
            return _grounding_score(record, answer)
    except DataError as e:  # malformed ground truth: say so in the page rather than fail the answer
        return Score(None, f"cannot score: {e}")
    if task == "region_caption":
        return Score(None, "captions are scored by `dvc repro` (ROUGE, METEOR); compare with the references")
    return None


def truth_drawing(record: Record) -> str:
    """Text whose boxes show the ground truth: the answer's boxes (labelled with the question's phrase when
    the answer names none), else the question's boxes labelled with the answer ([identify] {box})."""
    answer, question = record.answers[0], record.first_question
    if parse_boxes(answer):
        phrases = parse_phrases(question)
        return answer if parse_phrases(answer) or not phrases else f"<p>{phrases[0]}</p> {answer}"
    boxes = "".join(b.to_text() for b in parse_boxes(question))
    return f"<p>{answer[:40]}</p> {boxes}" if boxes else ""


@dataclass(frozen=True)
class ModelAnswer:
    name: str
    answer: str
    drawn: Image.Image
    """The image with the answer's boxes, in ``geodistill chat``'s colours."""
    n_boxes: int
    seconds: float
    """Time spent generating."""
    tokens: int
    """Answer tokens (the decoded answer encoded again, without special tokens)."""
    score: Score | None
    error: str | None = None
    """Why this model gave no answer (e.g. the prompt does not fit its context)."""

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None


def answer_all(
    models: Sequence[DemoModel],
    picture: Image.Image,
    turn: Turn,
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    truth: Record | None = None,
) -> list[ModelAnswer]:
    """Every model's greedy answer to ``turn`` about ``picture``, in order, each drawn on a display copy."""
    shown = display_copy(picture)
    out = []
    for m in models:
        try:
            text, _, seconds = chat.ask(
                m.model, m.tok, m.transform, picture, turn, max_new_tokens=max_new_tokens
            )
        except GeodistillError as e:
            out.append(ModelAnswer(m.name, "", shown, 0, 0.0, 0, None, error=str(e)))
            continue
        tokens = len(m.tok.encode(text, add_special_tokens=False)) if text else 0
        drawn = chat.render_boxes(shown, text)
        n_boxes = len(parse_boxes(text))
        out.append(ModelAnswer(m.name, text, drawn, n_boxes, seconds, tokens, score(truth, text)))
    return out


def default_specs(candidates: Mapping[str, Path]) -> list[tuple[str, Path]]:
    """The candidates whose folders exist (the pipeline's models after ``dvc repro``)."""
    return [(n, d) for n, d in candidates.items() if d.exists()]
