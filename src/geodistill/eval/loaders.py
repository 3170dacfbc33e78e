"""Loaders for the real evaluation benchmarks, producing :class:`Record` s with ground truth in ``meta``.

- :func:`load_scene_folder`: UCMerced / AID, one folder of images per class -> task "scene",
  meta ``label``, ``classes``;
- :func:`load_rsvqa`: RSVQA-LR/HR ``*_questions/answers/images.json`` + image folder -> "vqa",
  meta ``qtype``, ``answers``;
- :func:`load_geochat_referring`: GeoChat-Bench referring/grounding JSONL + image folder -> "referring",
  meta ``boxes``, ``polygons``, ``width``, ``height``, ``size``, ``multi``, ``type``;
- :func:`load_geochat_region_captions`: GeoChat-Bench region-caption JSON(L) + image folder ->
  "region_caption", meta ``refs``, ``boxes``.

Each record is one question: the first human turn is ``<image>\\n`` + the prompt GeoChat's evaluation
scripts use, the gpt turn the ground-truth answer. ``image`` is relative to the image folder the
loader was given. Every image is checked when the set is loaded (inside its folder, and decoded whole,
so a truncated file fails here and not mid-generation), and item ids are unique. Bad input raises a
:class:`DataError` naming the file, the record and the field; with ``on_error="skip"`` the record is
left out and its message is kept in ``LoadResult.skipped``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from geodistill.data.records import (
    GROUNDING_PROMPT,
    IDENTIFY_PROMPT,
    REFER_PROMPT,
    SCENE_PROMPT,
    VQA_SUFFIX,
    ImageChecks,
    Record,
    format_boxes,
    parse_boxes,
    parse_record,
)
from geodistill.errors import DataError
from geodistill.eval.metrics import object_size
from geodistill.eval.polygons import parse_polygons, polygon_to_box

OnError = Literal["raise", "skip"]

IMAGE_EXTS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")


@dataclass(frozen=True)
class LoadResult:
    """The records that loaded and, for ``on_error="skip"``, why each of the others did not."""

    records: list[Record]
    skipped: list[str] = field(default_factory=list)
    """One DataError message per skipped record; always empty with ``on_error="raise"``."""

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)


class _Errors:
    """The bad-input policy: re-raise (default) or count the skip and go on."""

    def __init__(self, on_error: str) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.skipped: list[str] = []

    def handle(self, e: DataError) -> None:
        if self.on_error == "raise":
            raise e
        self.skipped.append(str(e))


class CheckedRecords:
    """The records of one evaluation file: validated by the schema's own checks (boxes, turns, task),
    their image checked (:class:`ImageChecks`), their id unique; bad ones go to the policy."""

    def __init__(self, source: Path, image_dir: Path, image_field: str, on_error: str) -> None:
        self.source = source
        self.images = ImageChecks(image_dir)
        self.image_field = image_field
        """The field of the benchmark's own item that names the image (reported with an image problem)."""
        self.errors = _Errors(on_error)
        self.records: list[Record] = []
        self._ids: set[str] = set()

    def add(self, obj: dict[str, Any], source_id: Any = None) -> None:
        """Validate and keep one record (raises DataError; call inside ``try`` and pass it to skip).

        ``source_id``: the item's id in the benchmark file, when the record's id is built from it.
        """
        rec = parse_record(obj, source=str(self.source), index=len(self.records))
        fail = _where(self.source, rec.id if source_id is None else source_id)
        why = self.images.problem(rec.image)
        if why is not None:
            raise fail(self.image_field, why)
        if rec.id in self._ids:
            raise fail("id", "another item of this set has this id; ids must differ")
        self._ids.add(rec.id)
        self.records.append(rec)

    def skip(self, e: DataError) -> None:
        self.errors.handle(e)

    def result(self) -> LoadResult:
        return LoadResult(self.records, self.errors.skipped)


def _where(path: Path | str, rid: Any) -> Callable[[str, str], DataError]:
    def fail(fld: str, msg: str) -> DataError:
        return DataError(f"{path}: record {rid!r}, field '{fld}': {msg}")

    return fail


def _conversation(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": answer}]


# ------------------------------------------------------------------------------------- UCMerced / AID

_CAMEL_RE = re.compile(r"(?<=[a-z])(?=[A-Z])")


def readable_class(folder: str) -> str:
    """A class name from its folder name: ``Dense_Residential`` / ``DenseResidential`` -> "dense
    residential"; ``denseresidential`` (UCMerced) stays as it is."""
    s = _CAMEL_RE.sub(" ", folder)
    s = re.sub(r"[_\-\s]+", " ", s)
    return s.strip().lower()


def _class_images(root: Path, exts: set[str], errors: _Errors) -> dict[str, list[Path]]:
    """Image files per class folder, folders sorted by class name (an empty folder goes to the policy)."""
    # Sorted by class name, not folder name: "Dense_Residential" must not sort before "airplane".
    folders = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: (readable_class(p.name), p.name),
    )
    images: dict[str, list[Path]] = {}
    for d in folders:
        files = sorted(
            f for f in d.iterdir() if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in exts
        )
        if not files:
            errors.handle(
                DataError(f"{d}: class folder '{d.name}' holds no image ({', '.join(sorted(exts))})")
            )
            continue
        images[d.name] = files
    if not images:
        raise DataError(f"{root}: no class folder with images; expected {root}/<class>/<image>")
    return images


def load_scene_folder(
    root: str | Path,
    *,
    dataset: str | None = None,
    extensions: Collection[str] = IMAGE_EXTS,
    on_error: OnError = "raise",
) -> LoadResult:
    """Scene-classification records from ``root/<class folder>/<image>`` (UCMerced, AID).

    The class list (sorted by class name) is in every prompt and in ``meta["classes"]``; the label in
    ``meta["label"]`` and the gpt answer. An item's id is ``<dataset>/<class folder>/<file name>``
    (the file name with its extension: ``x.png`` and ``x.tif`` are two items). Files with other
    extensions (and hidden files) are ignored; a class folder without images is a DataError (or a skip).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: scene dataset folder not found")
    out = CheckedRecords(root, root, "image", on_error)
    name = dataset or root.name
    images = _class_images(root, {e.lower() for e in extensions}, out.errors)
    classes = [readable_class(c) for c in images]
    dupes = {c for c in classes if classes.count(c) > 1}
    if dupes:
        raise DataError(f"{root}: class folders {sorted(dupes)} give the same class name")
    prompt = SCENE_PROMPT.format(classes=", ".join(classes))
    for folder, label in zip(images, classes, strict=True):
        for f in images[folder]:
            image = f"{folder}/{f.name}"
            obj = {
                "id": f"{name}/{image}",
                "image": image,
                "image_id": image,
                "task": "scene",
                "conversations": _conversation(prompt, label),
                "meta": {"label": label, "classes": classes, "dataset": name},
            }
            try:
                out.add(obj)
            except DataError as e:
                out.skip(e)
    return out.result()


# --------------------------------------------------------------------------------------------- RSVQA


def rsvqa_files(folder: str | Path, prefix: str) -> tuple[Path, Path, Path]:
    """The three RSVQA JSON files of one split, e.g. ``prefix="USGS_split_test_phili"`` (HR test set 2,
    GeoChat's HRBEN) or ``"LR_split_test"`` (LRBEN)."""
    folder = Path(folder)
    return tuple(folder / f"{prefix}_{kind}.json" for kind in ("questions", "answers", "images"))  # type: ignore[return-value]


def _load_json_list(path: Path, key: str) -> list[Any]:
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    if not isinstance(raw, dict) or not isinstance(raw.get(key), list):
        raise DataError(f"{path}: expected a JSON object with a list '{key}'")
    return raw[key]


def _is_key(v: Any) -> bool:
    return isinstance(v, int | str) and not isinstance(v, bool)


def _by_id(path: Path, items: list[Any], errors: _Errors) -> dict[Any, dict[str, Any]]:
    out: dict[Any, dict[str, Any]] = {}
    for i, it in enumerate(items):
        if not isinstance(it, dict) or not _is_key(it.get("id")):
            errors.handle(DataError(f"{path}: record #{i}, field 'id': missing (an integer or string)"))
            continue
        out[it["id"]] = it
    return out


@dataclass(frozen=True)
class _Rsvqa:
    """One RSVQA split: its three files read, and the image folder's listing."""

    questions_file: Path
    answers_file: Path
    images_file: Path
    questions: list[Any]
    answers: dict[Any, dict[str, Any]]
    images: dict[Any, dict[str, Any]]
    image_dir: Path
    present: set[str]
    """File names in ``image_dir`` (one listing instead of a stat per question)."""
    extensions: Sequence[str]


def _read_rsvqa(
    questions: Path, answers: Path, images: Path, image_dir: Path, extensions: Sequence[str], errors: _Errors
) -> _Rsvqa:
    qs = _load_json_list(questions, "questions")
    ans = _by_id(answers, _load_json_list(answers, "answers"), errors)
    imgs = _by_id(images, _load_json_list(images, "images"), errors)
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: RSVQA image folder not found")
    present = set(os.listdir(image_dir))
    return _Rsvqa(questions, answers, images, qs, ans, imgs, image_dir, present, extensions)


def _rsvqa_answers(s: _Rsvqa, q: dict[str, Any], fail: Callable[[str, str], DataError]) -> list[str]:
    """The active, non-empty answer texts of question ``q``."""
    aids = q.get("answers_ids")
    if not isinstance(aids, list) or not aids or not all(_is_key(a) for a in aids):
        raise fail("answers_ids", f"expected a non-empty list of answer ids, got {aids!r:.80}")
    missing = [a for a in aids if a not in s.answers]
    if missing:
        raise fail("answers_ids", f"answer ids {missing[:5]} are not in {s.answers_file}")
    texts = [str(s.answers[a].get("answer", "")).strip() for a in aids if s.answers[a].get("active", True)]
    texts = [t for t in texts if t]
    if not texts:
        raise fail("answers_ids", f"no active, non-empty answer in {s.answers_file}")
    return texts


def _rsvqa_image(s: _Rsvqa, img_id: Any, fail: Callable[[str, str], DataError]) -> str:
    """The file name of image ``img_id``: ``{img_id}{ext}`` for the first extension that exists."""
    fname = next((f"{img_id}{e}" for e in s.extensions if f"{img_id}{e}" in s.present), None)
    if fname is None:
        raise fail("img_id", f"no image {img_id}{{{','.join(s.extensions)}}} in {s.image_dir}")
    return fname


def _rsvqa_record(s: _Rsvqa, q: Any, i: int, wanted: set[str] | None) -> dict[str, Any] | None:
    """The record of question #i, or None when the dataset's own selection (or ``wanted``) leaves it out."""
    rid = q.get("id", f"#{i}") if isinstance(q, dict) else f"#{i}"
    fail = _where(s.questions_file, rid)
    if not isinstance(q, dict):
        raise fail("<record>", f"expected an object, got {type(q).__name__}")
    qtype = q.get("type")
    if not q.get("active", True):
        return None
    if not isinstance(qtype, str) or not qtype:
        raise fail("type", "missing question type")
    if wanted is not None and qtype not in wanted:
        return None
    if not _is_key(q.get("img_id")):
        raise fail("img_id", f"missing or not an id: {q.get('img_id')!r}")
    img = s.images.get(q["img_id"])
    if img is None:
        raise fail("img_id", f"{q.get('img_id')!r} is not an image of {s.images_file}")
    if not img.get("active", True):
        return None
    text = q.get("question")
    if not isinstance(text, str) or not text.strip():
        raise fail("question", "missing or empty question text")
    answers = _rsvqa_answers(s, q, fail)
    stem = s.questions_file.name.removesuffix(".json").removesuffix("_questions")
    return {
        "id": f"{stem}/{rid}",
        "image": _rsvqa_image(s, q["img_id"], fail),
        "image_id": str(q["img_id"]),
        "task": "vqa",
        "conversations": _conversation(f"{text.strip()} {VQA_SUFFIX}", answers[0]),
        "meta": {"qtype": qtype, "answers": answers, "question": text, "dataset": stem},
    }


def load_rsvqa(
    questions: str | Path,
    answers: str | Path,
    images: str | Path,
    image_dir: str | Path,
    *,
    qtypes: Collection[str] | None = None,
    extensions: Sequence[str] = (".tif", ".png", ".jpg"),
    on_error: OnError = "raise",
) -> LoadResult:
    """VQA records from RSVQA's JSON files (see :func:`rsvqa_files`) and its image folder.

    Questions whose ``active`` flag, or whose image's flag, is false are left out (the dataset's own
    selection, not an error). ``qtypes`` keeps only those types (presence, comparison, count,
    rural_urban, area); None keeps all. The image is ``{img_id}{ext}`` for the first of
    ``extensions`` that exists.
    """
    qpath, image_dir = Path(questions), Path(image_dir)
    out = CheckedRecords(qpath, image_dir, "img_id", on_error)
    s = _read_rsvqa(qpath, Path(answers), Path(images), image_dir, extensions, out.errors)
    wanted = None if qtypes is None else set(qtypes)
    for i, q in enumerate(s.questions):
        try:
            obj = _rsvqa_record(s, q, i, wanted)
            if obj is not None:
                out.add(obj, source_id=q["id"])
        except DataError as e:
            out.skip(e)
    return out.result()


# ------------------------------------------------------------------------------ GeoChat-Bench (JSON(L))


def _read_json_objects(path: Path, errors: _Errors) -> Iterator[tuple[str, Any]]:
    """(where, object) from a JSONL file ("line 3"), or from a JSON list ("#2"); GeoChat-Bench ships both.

    A generator, so a bad line is reported in file order among the records' own errors.
    """
    try:
        text = path.read_text()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    if text.lstrip().startswith("["):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from e
        if not isinstance(raw, list):
            raise DataError(f"{path}: expected a JSON list of objects or JSON lines")
        yield from ((f"#{i}", obj) for i, obj in enumerate(raw))
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            errors.handle(DataError(f"{path}: record at line {n}, field '<line>': invalid JSON ({e.msg})"))
            continue
        yield f"line {n}", obj


def _image_file(image_dir: Path, image_id: str) -> str | None:
    """GeoChat's scripts open ``{image_id}.png``; accept an id that already carries its extension."""
    for name in (f"{image_id}.png", image_id, *(f"{image_id}{e}" for e in IMAGE_EXTS)):
        if Path(name).suffix.lower() in IMAGE_EXTS and (image_dir / name).is_file():
            return name
    return None


def _field_str(obj: Mapping[str, Any], fld: str, fail: Callable[[str, str], DataError]) -> str:
    v = obj.get(fld)
    if not isinstance(v, str | int) or not str(v).strip():
        raise fail(fld, "missing or empty")
    return str(v).strip()


@dataclass(frozen=True)
class _BenchItem:
    """The fields every GeoChat-Bench item has, checked."""

    qid: str
    image_id: str
    image: str
    """The image's file name in the image folder (checked: inside it and readable)."""
    question: str
    fail: Callable[[str, str], DataError]


def _bench_item(obj: Any, where: str, path: Path, out: CheckedRecords) -> _BenchItem:
    rid = obj.get("question_id", where) if isinstance(obj, dict) else where
    fail = _where(path, rid)
    if not isinstance(obj, dict):
        raise fail("<record>", f"expected a JSON object, got {type(obj).__name__}")
    qid = _field_str(obj, "question_id", fail)
    image_id = _field_str(obj, "image_id", fail)
    q = obj.get("question", obj.get("text"))
    if not isinstance(q, str) or not q.strip():
        raise fail("question", "missing or empty (neither 'question' nor 'text' holds it)")
    image = _image_file(out.images.root, image_id)
    if image is None:
        raise fail("image_id", f"no image {image_id}.png in {out.images.root}")
    why = out.images.problem(image)
    if why is not None:
        raise fail("image_id", why)
    return _BenchItem(qid, image_id, image, q.strip(), fail)


def _referring_record(obj: dict[str, Any], it: _BenchItem, image_dir: Path) -> dict[str, Any]:
    with Image.open(image_dir / it.image) as im:  # header only: the image was decoded when checked
        w, h = im.size
    try:
        polys = parse_polygons(obj.get("ground_truth"))
        boxes = [polygon_to_box(p, w, h) for p in polys]
    except ValueError as e:
        raise it.fail("ground_truth", str(e)) from None
    kind = str(obj.get("type", "ref")).strip().lower()
    if any(tok in it.question for tok in ("[refer]", "[grounding]")):
        prompt = it.question  # already a GeoChat prompt
    else:
        prompt = (REFER_PROMPT if kind == "ref" else GROUNDING_PROMPT).format(q=it.question)
    group = obj.get("size_group")
    return {
        "id": it.qid,
        "image": it.image,
        "image_id": it.image_id,
        "task": "referring",
        "conversations": _conversation(prompt, format_boxes(boxes)),
        "meta": {
            "boxes": [b.to_text() for b in boxes],
            "polygons": [[list(pt) for pt in p] for p in polys],
            "width": w,
            "height": h,
            "size": str(group).strip().lower() if group else object_size(polys, w, h),
            "multi": len(polys) > 1,
            "type": kind,
            "obj_ids": obj.get("obj_ids"),
            "dataset": obj.get("dataset"),
            "question": it.question,
        },
    }


def load_geochat_referring(
    path: str | Path, image_dir: str | Path, *, on_error: OnError = "raise"
) -> LoadResult:
    """Referring / grounding records from GeoChat-Bench's JSONL (``referring.jsonl``).

    Fields used: ``question_id``, ``image_id`` (the image is ``{image_id}.png``), ``question`` (or
    ``text``), ``ground_truth`` (pixel polygons, see :func:`~geodistill.eval.polygons.parse_polygons`),
    ``type`` ('ref' gets GeoChat's ``[refer]`` prompt, anything else ``[grounding]``), optional
    ``size_group``, ``obj_ids``, ``dataset``. The image size comes from the image file (GeoChat-Bench
    mixes 600, 800 and 1024 px sources). The gpt answer is the boxes in GeoChat's text form
    (:func:`~geodistill.eval.polygons.polygon_to_box`); ``meta``
    keeps the exact polygons.
    """
    path, image_dir = Path(path), Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: GeoChat-Bench image folder not found")
    out = CheckedRecords(path, image_dir, "image_id", on_error)
    for where, obj in _read_json_objects(path, out.errors):
        try:
            out.add(_referring_record(obj, _bench_item(obj, where, path, out), image_dir))
        except DataError as e:
            out.skip(e)
    return out.result()


def _region_caption_record(obj: dict[str, Any], it: _BenchItem) -> dict[str, Any]:
    boxes = parse_boxes(it.question)
    if not boxes:
        raise it.fail("question", f"no region box {{<x1><y1><x2><y2>|<theta>}} in {it.question!r:.80}")
    gt = obj.get("ground_truth")
    refs = [gt] if isinstance(gt, str) else gt
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise it.fail("ground_truth", f"expected a caption or a list of captions, got {gt!r:.80}")
    refs = [r.strip() for r in refs if r.strip()]
    if not refs:
        raise it.fail("ground_truth", "empty caption")
    prompt = it.question if "[identify]" in it.question else IDENTIFY_PROMPT.format(q=it.question)
    return {
        "id": it.qid,
        "image": it.image,
        "image_id": it.image_id,
        "task": "region_caption",
        "conversations": _conversation(prompt, refs[0]),
        "meta": {"refs": refs, "boxes": [b.to_text() for b in boxes], "dataset": obj.get("dataset")},
    }


def load_geochat_region_captions(
    path: str | Path, image_dir: str | Path, *, on_error: OnError = "raise"
) -> LoadResult:
    """Region-caption records from GeoChat-Bench's JSON(L): ``question_id``, ``image_id``, ``question``
    (the region as a grid box ``{<x1><y1><x2><y2>|<theta>}``, optionally already behind ``[identify]``)
    and ``ground_truth`` (a caption or a list of captions, kept in ``meta["refs"]``)."""
    path, image_dir = Path(path), Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: GeoChat-Bench image folder not found")
    out = CheckedRecords(path, image_dir, "image_id", on_error)
    for where, obj in _read_json_objects(path, out.errors):
        try:
            out.add(_region_caption_record(obj, _bench_item(obj, where, path, out)))
        except DataError as e:
            out.skip(e)
    return out.result()
