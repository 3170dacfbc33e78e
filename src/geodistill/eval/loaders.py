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
loader was given. Bad input raises a :class:`DataError` naming the file, the record and the field;
with ``on_error="skip"`` the record is left out and its message is kept in ``LoadResult.skipped``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from shapely.geometry import MultiPoint, Polygon

from geodistill.data.records import Box, Record, format_boxes, parse_boxes, parse_record
from geodistill.errors import DataError
from geodistill.eval.metrics import object_size

OnError = Literal["raise", "skip"]

SCENE_PROMPT = "Classify the image in the following classes: {classes}. Answer in one word or a short phrase."
VQA_SUFFIX = "Answer the question using a single word or phrase."
REFER_PROMPT = "[refer] Give me the location of <p> {q} </p>"
GROUNDING_PROMPT = "[grounding] {q}"
IDENTIFY_PROMPT = "[identify] What is the object present at {q}"

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


def _where(path: Path | str, rid: Any) -> Callable[[str, str], DataError]:
    def fail(fld: str, msg: str) -> DataError:
        return DataError(f"{path}: record {rid!r}, field '{fld}': {msg}")

    return fail


def _record(obj: dict[str, Any], source: Path, index: int) -> Record:
    """Validate the record we built with the schema's own checks (boxes, turns, task)."""
    return parse_record(obj, source=str(source), index=index)


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


def load_scene_folder(
    root: str | Path,
    *,
    dataset: str | None = None,
    extensions: Collection[str] = IMAGE_EXTS,
    on_error: OnError = "raise",
) -> LoadResult:
    """Scene-classification records from ``root/<class folder>/<image>`` (UCMerced, AID).

    The class list (sorted by class name) is in every prompt and in ``meta["classes"]``; the label in
    ``meta["label"]`` and the gpt answer. Files with other extensions (and hidden files) are ignored; a
    class folder without images is a DataError (or a skip).
    """
    root = Path(root)
    errors = _Errors(on_error)
    if not root.is_dir():
        raise DataError(f"{root}: scene dataset folder not found")
    name = dataset or root.name
    exts = {e.lower() for e in extensions}
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
    classes = [readable_class(c) for c in images]
    dupes = {c for c in classes if classes.count(c) > 1}
    if dupes:
        raise DataError(f"{root}: class folders {sorted(dupes)} give the same class name")
    prompt = SCENE_PROMPT.format(classes=", ".join(classes))
    records = []
    for folder, label in zip(images, classes, strict=True):
        for f in images[folder]:
            image_id = f"{folder}/{f.stem}"
            obj = {
                "id": f"{name}/{image_id}",
                "image": f"{folder}/{f.name}",
                "image_id": image_id,
                "task": "scene",
                "conversations": _conversation(prompt, label),
                "meta": {"label": label, "classes": classes, "dataset": name},
            }
            try:
                records.append(_record(obj, root, len(records)))
            except DataError as e:
                errors.handle(e)
    return LoadResult(records, errors.skipped)


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
    qpath, apath, ipath, image_dir = Path(questions), Path(answers), Path(images), Path(image_dir)
    errors = _Errors(on_error)
    qs = _load_json_list(qpath, "questions")
    ans = _by_id(apath, _load_json_list(apath, "answers"), errors)
    imgs = _by_id(ipath, _load_json_list(ipath, "images"), errors)
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: RSVQA image folder not found")
    present = set(os.listdir(image_dir))  # one listing instead of a stat per question
    wanted = None if qtypes is None else set(qtypes)
    stem = qpath.name.removesuffix(".json").removesuffix("_questions")
    records: list[Record] = []
    for i, q in enumerate(qs):
        try:
            rid = q.get("id", f"#{i}") if isinstance(q, dict) else f"#{i}"
            fail = _where(qpath, rid)
            if not isinstance(q, dict):
                raise fail("<record>", f"expected an object, got {type(q).__name__}")
            if not q.get("active", True):
                continue
            qtype = q.get("type")
            if not isinstance(qtype, str) or not qtype:
                raise fail("type", "missing question type")
            if wanted is not None and qtype not in wanted:
                continue
            if not _is_key(q.get("img_id")):
                raise fail("img_id", f"missing or not an id: {q.get('img_id')!r}")
            img = imgs.get(q["img_id"])
            if img is None:
                raise fail("img_id", f"{q.get('img_id')!r} is not an image of {ipath}")
            if not img.get("active", True):
                continue
            text = q.get("question")
            if not isinstance(text, str) or not text.strip():
                raise fail("question", "missing or empty question text")
            aids = q.get("answers_ids")
            if not isinstance(aids, list) or not aids or not all(_is_key(a) for a in aids):
                raise fail("answers_ids", f"expected a non-empty list of answer ids, got {aids!r:.80}")
            missing = [a for a in aids if a not in ans]
            if missing:
                raise fail("answers_ids", f"answer ids {missing[:5]} are not in {apath}")
            texts = [str(ans[a].get("answer", "")).strip() for a in aids if ans[a].get("active", True)]
            texts = [t for t in texts if t]
            if not texts:
                raise fail("answers_ids", f"no active, non-empty answer in {apath}")
            fname = next((f"{q['img_id']}{e}" for e in extensions if f"{q['img_id']}{e}" in present), None)
            if fname is None:
                raise fail("img_id", f"no image {q['img_id']}{{{','.join(extensions)}}} in {image_dir}")
            obj = {
                "id": f"{stem}/{rid}",
                "image": fname,
                "image_id": str(q["img_id"]),
                "task": "vqa",
                "conversations": _conversation(f"{text.strip()} {VQA_SUFFIX}", texts[0]),
                "meta": {"qtype": qtype, "answers": texts, "question": text, "dataset": stem},
            }
            records.append(_record(obj, qpath, i))
        except DataError as e:
            errors.handle(e)
    return LoadResult(records, errors.skipped)


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


def _image_size(path: Path, sizes: dict[str, tuple[int, int] | str]) -> tuple[int, int] | str:
    """(width, height) from the file header (cached per image), or why the image cannot be read."""
    key = str(path)
    if key not in sizes:
        try:
            with Image.open(path) as im:
                sizes[key] = im.size
        except Exception as e:  # PIL raises many types for corrupt files; all mean "unreadable"
            sizes[key] = f"image file {path} is unreadable ({type(e).__name__}: {e})"
    return sizes[key]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def parse_polygons(gt: Any) -> list[list[tuple[float, float]]]:
    """Ground-truth polygons in pixels, from the shapes GeoChat-Bench uses.

    Accepted: one polygon ``[[x, y] x 4]`` or ``[x1, y1, ..., x4, y4]``, an axis-aligned
    ``[x1, y1, x2, y2]``, a list of any of these, or the same as a JSON string. Raises ValueError.
    """
    if isinstance(gt, str):
        try:
            gt = json.loads(gt)
        except json.JSONDecodeError as e:
            raise ValueError(f"a string that is not JSON ({e.msg})") from e

    def one(p: Any) -> list[tuple[float, float]] | None:
        if isinstance(p, list | tuple):
            if len(p) == 4 and all(isinstance(q, list | tuple) and len(q) == 2 for q in p):
                if all(_is_number(v) for q in p for v in q):
                    return [(float(q[0]), float(q[1])) for q in p]
                raise ValueError(f"corner coordinates must be finite numbers: {p!r}")
            if len(p) == 8 and all(_is_number(v) for v in p):
                return [(float(p[k]), float(p[k + 1])) for k in range(0, 8, 2)]
            if len(p) == 4 and all(_is_number(v) for v in p):
                x1, y1, x2, y2 = (float(v) for v in p)
                return [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
        return None

    single = one(gt)
    if single is not None:
        return [single]
    if isinstance(gt, list | tuple) and gt:
        polys = [one(p) for p in gt]
        bad = [k for k, p in enumerate(polys) if p is None]
        if not bad:
            return polys  # type: ignore[return-value]
        raise ValueError(
            f"item {bad[0]} ({gt[bad[0]]!r:.80}) is not a polygon [[x, y] x 4], [x1, y1, ..., x4, y4] "
            "or [x1, y1, x2, y2]"
        )
    raise ValueError(f"expected a polygon or a non-empty list of polygons, got {gt!r:.80}")


def polygon_to_box(points: Sequence[tuple[float, float]], width: float, height: float) -> Box:
    """The rotated grid box of a pixel quadrilateral (its minimum-area rectangle), on GeoChat's integer
    0-100 grid.

    Angle convention (as :meth:`Box.polygon`): ``(x1, y1, x2, y2)`` is the box before rotation, turned
    about its centre by theta degrees clockwise on screen (image y down), theta in [0, 90) as in
    GeoChat's data. The rectangle is rotated in pixel space, so on a non-square image the grid box is
    scaled per axis before rotation. Where the unrotated box would leave the grid (a long, thin, tilted
    object at the border) the equivalent form with theta - 90 is tried, then the box is clipped; exact
    IoU uses the original polygon, kept in ``meta["polygons"]``.
    """
    rect = MultiPoint(points).minimum_rotated_rectangle
    if not isinstance(rect, Polygon) or rect.area <= 0:
        raise ValueError(f"degenerate polygon {list(points)!r} (no area)")
    c = list(rect.exterior.coords)[:4]
    (x0, y0), (x1, y1), (x2, y2) = c[0], c[1], c[2]
    w, h = math.hypot(x1 - x0, y1 - y0), math.hypot(x2 - x1, y2 - y1)
    # Direction of the box's "width" edge, on GeoChat's integer-degree grid, then folded into [0, 90):
    # a quarter turn swaps which side is the width.
    theta = round(math.degrees(math.atan2(y1 - y0, x1 - x0)))
    turns = theta // 90
    theta -= 90 * turns
    if turns % 2:
        w, h = h, w
    cx, cy = rect.centroid.x, rect.centroid.y
    sx, sy = 100.0 / width, 100.0 / height

    def grid(bw: float, bh: float) -> list[float]:
        xy = [(cx - bw / 2) * sx, (cy - bh / 2) * sy, (cx + bw / 2) * sx, (cy + bh / 2) * sy]
        return [float(round(v)) for v in xy]

    def overflow(o: tuple[float, float, int]) -> float:
        return sum(max(0.0, -v, v - 100.0) for v in grid(o[0], o[1]))

    best = min([(w, h, theta), (h, w, theta - 90)], key=overflow)  # min keeps the first on a tie
    gx1, gy1, gx2, gy2 = grid(best[0], best[1])
    t = best[2]
    gx1, gy1 = min(max(gx1, 0.0), 99.0), min(max(gy1, 0.0), 99.0)
    gx2, gy2 = max(min(gx2, 100.0), gx1 + 1.0), max(min(gy2, 100.0), gy1 + 1.0)  # at least one grid cell
    return Box(gx1, gy1, gx2, gy2, None if t == 0 else float(t))


def _field_str(obj: Mapping[str, Any], fld: str, fail: Callable[[str, str], DataError]) -> str:
    v = obj.get(fld)
    if not isinstance(v, str | int) or not str(v).strip():
        raise fail(fld, "missing or empty")
    return str(v).strip()


def load_geochat_referring(
    path: str | Path, image_dir: str | Path, *, on_error: OnError = "raise"
) -> LoadResult:
    """Referring / grounding records from GeoChat-Bench's JSONL (``referring.jsonl``).

    Fields used: ``question_id``, ``image_id`` (the image is ``{image_id}.png``), ``question`` (or
    ``text``), ``ground_truth`` (pixel polygons, see :func:`parse_polygons`), ``type`` ('ref' gets
    GeoChat's ``[refer]`` prompt, anything else ``[grounding]``), optional ``size_group``, ``obj_ids``,
    ``dataset``. The image size comes from the image file (GeoChat-Bench mixes 600, 800 and 1024 px
    sources). The gpt answer is the boxes in GeoChat's text form (:func:`polygon_to_box`); ``meta``
    keeps the exact polygons.
    """
    path, image_dir = Path(path), Path(image_dir)
    errors = _Errors(on_error)
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: GeoChat-Bench image folder not found")
    sizes: dict[str, tuple[int, int] | str] = {}
    records: list[Record] = []
    for where, obj in _read_json_objects(path, errors):
        rid = obj.get("question_id", where) if isinstance(obj, dict) else where
        fail = _where(path, rid)
        try:
            if not isinstance(obj, dict):
                raise fail("<record>", f"expected a JSON object, got {type(obj).__name__}")
            qid = _field_str(obj, "question_id", fail)
            image_id = _field_str(obj, "image_id", fail)
            q = obj.get("question", obj.get("text"))
            if not isinstance(q, str) or not q.strip():
                raise fail("question", "missing or empty (neither 'question' nor 'text' holds the phrase)")
            kind = str(obj.get("type", "ref")).strip().lower()
            fname = _image_file(image_dir, image_id)
            if fname is None:
                raise fail("image_id", f"no image {image_id}.png in {image_dir}")
            size = _image_size(image_dir / fname, sizes)
            if isinstance(size, str):
                raise fail("image_id", size)
            w, h = size
            try:
                polys = parse_polygons(obj.get("ground_truth"))
                boxes = [polygon_to_box(p, w, h) for p in polys]
            except ValueError as e:
                raise fail("ground_truth", str(e)) from None
            q = q.strip()
            if any(tok in q for tok in ("[refer]", "[grounding]")):
                prompt = q  # already a GeoChat prompt
            else:
                prompt = (REFER_PROMPT if kind == "ref" else GROUNDING_PROMPT).format(q=q)
            group = obj.get("size_group")
            rec = {
                "id": qid,
                "image": fname,
                "image_id": image_id,
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
                    "question": q,
                },
            }
            records.append(_record(rec, path, len(records)))
        except DataError as e:
            errors.handle(e)
    return LoadResult(records, errors.skipped)


def load_geochat_region_captions(
    path: str | Path, image_dir: str | Path, *, on_error: OnError = "raise"
) -> LoadResult:
    """Region-caption records from GeoChat-Bench's JSON(L): ``question_id``, ``image_id``, ``question``
    (the region as a grid box ``{<x1><y1><x2><y2>|<theta>}``, optionally already behind ``[identify]``)
    and ``ground_truth`` (a caption or a list of captions, kept in ``meta["refs"]``)."""
    path, image_dir = Path(path), Path(image_dir)
    errors = _Errors(on_error)
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: GeoChat-Bench image folder not found")
    records: list[Record] = []
    for where, obj in _read_json_objects(path, errors):
        rid = obj.get("question_id", where) if isinstance(obj, dict) else where
        fail = _where(path, rid)
        try:
            if not isinstance(obj, dict):
                raise fail("<record>", f"expected a JSON object, got {type(obj).__name__}")
            qid = _field_str(obj, "question_id", fail)
            image_id = _field_str(obj, "image_id", fail)
            q = obj.get("question", obj.get("text"))
            if not isinstance(q, str) or not q.strip():
                raise fail("question", "missing or empty")
            q = q.strip()
            boxes = parse_boxes(q)
            if not boxes:
                raise fail("question", f"no region box {{<x1><y1><x2><y2>|<theta>}} in {q!r:.80}")
            gt = obj.get("ground_truth")
            refs = [gt] if isinstance(gt, str) else gt
            if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
                raise fail("ground_truth", f"expected a caption or a list of captions, got {gt!r:.80}")
            refs = [r.strip() for r in refs if r.strip()]
            if not refs:
                raise fail("ground_truth", "empty caption")
            fname = _image_file(image_dir, image_id)
            if fname is None:
                raise fail("image_id", f"no image {image_id}.png in {image_dir}")
            prompt = q if "[identify]" in q else IDENTIFY_PROMPT.format(q=q)
            rec = {
                "id": qid,
                "image": fname,
                "image_id": image_id,
                "task": "region_caption",
                "conversations": _conversation(prompt, refs[0]),
                "meta": {"refs": refs, "boxes": [b.to_text() for b in boxes], "dataset": obj.get("dataset")},
            }
            records.append(_record(rec, path, len(records)))
        except DataError as e:
            errors.handle(e)
    return LoadResult(records, errors.skipped)
