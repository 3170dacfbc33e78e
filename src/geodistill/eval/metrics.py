"""Metrics of the paper's four evaluation tasks: pure functions over model outputs and ground truth.

- scene classification (UCMerced, AID), :func:`classification_metrics`: OA, AA, per-class accuracy,
  confusion matrix;
- VQA (RSVQA-LR/HR), :func:`vqa_metrics`: accuracy per question type, mOA (mean over types), OA;
- referring (GeoChat-Bench referring and grounding questions), :func:`referring_metrics`: acc@0.5 and
  acc@0.25, overall and by object size, single/multi object and question type;
- region captions (GeoChat-Bench), :func:`caption_metrics`: ROUGE-1, ROUGE-L (F), METEOR 1.5 (Java,
  :mod:`geodistill.eval.meteor`).

Every score is a fraction in [0, 1] (the paper prints percentages); a score over zero items is None.
Model outputs are never trusted: an empty or unparseable output counts as wrong and is counted, and no
function here raises on garbage text. Ground truth that is malformed raises :class:`DataError`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shapely.geometry import Polygon

from geodistill.data.records import Box, parse_boxes
from geodistill.errors import DataError
from geodistill.eval.meteor import MeteorScorer

# ----------------------------------------------------------------------------------- answer normalisation

_ARTICLES = frozenset({"a", "an", "the"})
# VQA-style: answers say "2" and models say "two"; both normalise to the digit.
_NUMBER_WORDS = {
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
# A number keeps its decimal point ("2.5"); every other run of non-word characters separates tokens.
_TOKEN_RE = re.compile(r"\d+(?:\.\d+)?|[^\W_]+")
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}\b)")


def _tokens(s: str) -> list[str]:
    s = s.lower().replace("'", "").replace("\u2019", "")  # "don't" -> "dont", not "don t"
    s = _THOUSANDS_RE.sub("", s)  # "1,000" -> "1000"
    out = []
    for tok in _TOKEN_RE.findall(s):
        if tok in _ARTICLES:
            continue
        out.append(_NUMBER_WORDS.get(tok, tok))
    return out


def normalize_answer(s: str) -> str:
    """VQA-style normalisation: lowercase; punctuation (incl. a trailing period), apostrophes and the
    articles a/an/the dropped; number words zero..ten as digits; single spaces.

    ``"The Yes."`` -> ``"yes"``; ``"Two cars!"`` -> ``"2 cars"``; ``"1,000"`` -> ``"1000"``;
    ``"2.5 m"`` -> ``"2.5 m"``. Never raises (non-strings normalise to ``""``).
    """
    if not isinstance(s, str):
        return ""
    return " ".join(_tokens(s))


def _class_key(s: str) -> str:
    """Match key of a class name: the normalised answer without spaces.

    Class names come as "denseresidential" (UCMerced), "DenseResidential" (AID) or "dense residential"
    (readable); GeoChat's own scorer also compares with spaces removed.
    """
    key = normalize_answer(s).replace(" ", "")
    # A class literally named like an article ("a") would otherwise vanish.
    return key or (s.strip().lower() if isinstance(s, str) else "")


# ---------------------------------------------------------------------------------- scene classification

OTHER = "<other>"
"""Confusion-matrix column of predictions that name no class (unparsed or out-of-list answers)."""


def _check_lengths(**seqs: Sequence[Any]) -> int:
    lengths = {k: len(v) for k, v in seqs.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs must have the same length; got {lengths}")
    return next(iter(lengths.values()))


def _mean(xs: Iterable[float]) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def classification_metrics(preds: Sequence[str], labels: Sequence[str], classes: Sequence[str]) -> dict:
    """Scene-classification scores.

    A prediction names a class when its normalised, space-free form equals the class's (see
    :func:`normalize_answer`); anything else ("", "a city", a class not in the list) is wrong and lands
    in the :data:`OTHER` column.

    Returns ``{"OA", "AA", "per_class": {class: acc or None}, "confusion": [[int]], "rows": classes,
    "cols": classes + [OTHER], "n", "unparsed"}``: OA is correct / n; AA the mean per-class accuracy over
    the classes present in ``labels`` (a class with no test image has accuracy None and is left out).
    Confusion rows are true classes, columns predicted classes, both in ``classes`` order.
    """
    n = _check_lengths(preds=preds, labels=labels)
    keys = [_class_key(c) for c in classes]
    index: dict[str, int] = {}
    for i, (c, k) in enumerate(zip(classes, keys, strict=True)):
        if not k:
            raise DataError(f"class list: class #{i} {c!r} is empty after normalisation")
        if k in index:
            raise DataError(f"class list: {c!r} and {classes[index[k]]!r} are the same class once normalised")
        index[k] = i
    k_other = len(classes)
    cm = [[0] * (len(classes) + 1) for _ in classes]
    unparsed = 0
    for j, (p, y) in enumerate(zip(preds, labels, strict=True)):
        t = index.get(_class_key(y))
        if t is None:
            raise DataError(f"label #{j} {y!r} is not one of the {len(classes)} classes")
        q = index.get(_class_key(p), k_other)
        unparsed += q == k_other
        cm[t][q] += 1
    correct = sum(cm[i][i] for i in range(len(classes)))
    per_class: dict[str, float | None] = {}
    for i, c in enumerate(classes):
        total = sum(cm[i])
        per_class[c] = cm[i][i] / total if total else None
    return {
        "OA": correct / n if n else None,
        "AA": _mean(a for a in per_class.values() if a is not None),
        "per_class": per_class,
        "confusion": cm,
        "rows": list(classes),
        "cols": [*classes, OTHER],
        "n": n,
        "unparsed": unparsed,
    }


# ------------------------------------------------------------------------------------------------- VQA

_YES_NO = ("yes", "no")


def _vqa_match(pred: str, answer: str) -> bool:
    gt = normalize_answer(answer)
    p = normalize_answer(pred)
    if gt in _YES_NO:
        # Models answer "Yes, there is a road." to a yes/no question; the first word is the answer.
        first = p.split(" ", 1)[0]
        if first in _YES_NO:
            p = first
    return p == gt


def vqa_metrics(preds: Sequence[str], answers: Sequence[str], qtypes: Sequence[str]) -> dict:
    """Accuracy per question type by normalised exact match (:func:`normalize_answer`).

    For a yes/no ground truth, a prediction whose first word is yes/no is reduced to that word. Returns
    ``{"accuracy": {qtype: acc}, "n": {qtype: count}, "mOA": mean over types, "OA": over all
    questions, "n_total", "empty": predictions that normalise to ""}`` (an empty prediction is wrong).
    """
    n = _check_lengths(preds=preds, answers=answers, qtypes=qtypes)
    hits: dict[str, int] = {}
    counts: dict[str, int] = {}
    empty = 0
    for p, a, t in zip(preds, answers, qtypes, strict=True):
        counts[t] = counts.get(t, 0) + 1
        ok = _vqa_match(p, a)
        hits[t] = hits.get(t, 0) + ok
        empty += normalize_answer(p) == ""
    acc = {t: hits[t] / counts[t] for t in sorted(counts)}
    return {
        "accuracy": acc,
        "n": {t: counts[t] for t in sorted(counts)},
        "mOA": _mean(acc.values()),
        "OA": sum(hits.values()) / n if n else None,
        "n_total": n,
        "empty": empty,
    }


# ------------------------------------------------------------------------------------------- referring

#: Object size from the mean ground-truth box area as a fraction of the image area: COCO's 32^2 and
#: 96^2 pixel limits on a ~550 x 550 image (GeoChat-Bench images are 600-1024 px), i.e. small below
#: 0.3 %, medium below 3 %, large otherwise. A label given with the item (GeoChat-Bench's
#: ``size_group``) takes precedence.
SIZE_THRESHOLDS = {"small": 0.003, "medium": 0.03}

Points = Sequence[tuple[float, float]]


def object_size(polygons: Sequence[Points], width: float, height: float) -> str:
    """'small' / 'medium' / 'large' from the mean polygon area relative to the image (see SIZE_THRESHOLDS)."""
    if not polygons:
        raise ValueError("object_size needs at least one polygon")
    area = sum(_shape(p).area for p in polygons) / len(polygons)
    frac = area / (width * height)
    if frac < SIZE_THRESHOLDS["small"]:
        return "small"
    if frac < SIZE_THRESHOLDS["medium"]:
        return "medium"
    return "large"


def _shape(points: Points) -> Polygon:
    """A convex polygon from box corners in any order (the hull undoes a bow-tie corner order)."""
    hull = Polygon(points).convex_hull
    # Collinear or repeated corners give a LineString/Point hull: an empty box of area 0.
    return hull if isinstance(hull, Polygon) else Polygon()


def iou_matrix(pred: Sequence[Points], gt: Sequence[Points]) -> list[list[float]]:
    """IoU of every predicted with every ground-truth quadrilateral (pixel corners, rotated boxes
    included), ``[pred][gt]``; 0 where either shape is empty."""
    gt_shapes = [_shape(g) for g in gt]
    out = []
    for p in pred:
        a = _shape(p)
        row = []
        for b in gt_shapes:
            inter = 0.0 if a.is_empty or b.is_empty else a.intersection(b).area
            union = a.area + b.area - inter
            row.append(inter / union if union > 0 else 0.0)
        out.append(row)
    return out


def match_count(ious: Sequence[Sequence[float]], threshold: float) -> int:
    """How many ground-truth boxes are matched at IoU >= ``threshold``, one-to-one.

    Greedy by descending IoU (ties: gt order, then prediction order), as GeoChat's evaluation does: a
    predicted box matches at most one gt box, so repeating one correct box does not score several.
    """
    pairs = sorted(
        (-iou, j, i)
        for i, row in enumerate(ious)
        for j, iou in enumerate(row)
        if iou >= threshold and iou > 0
    )
    used_pred: set[int] = set()
    used_gt: set[int] = set()
    for _, j, i in pairs:
        if i not in used_pred and j not in used_gt:
            used_pred.add(i)
            used_gt.add(j)
    return len(used_gt)


@dataclass(frozen=True)
class ReferringItem:
    """One referring question: the generated text and the ground truth."""

    text: str
    """The model's output; boxes are parsed from it with :func:`parse_boxes`."""
    gt: tuple[Box, ...]
    """Ground-truth boxes on the 0-100 grid."""
    width: float
    height: float
    """Image size in pixels."""
    gt_polygons: tuple[Points, ...] | None = None
    """Exact ground-truth corners in pixels (GeoChat-Bench); used for IoU instead of ``gt`` when given."""
    size: str | None = None
    """Size label to report under; None: computed by :func:`object_size`."""
    multi: bool | None = None
    """Multi-object question; None: more than one gt box."""
    kind: str | None = None
    """Question type to report under (GeoChat-Bench 'ref' / 'grounding'); None: not reported."""

    @classmethod
    def from_meta(cls, text: str, meta: Mapping[str, Any]) -> ReferringItem:
        """From a referring record's ``meta`` (as the loaders and the synthetic benchmark write it)."""
        try:
            gt = tuple(b for s in meta["boxes"] for b in parse_boxes(s))
            polys = meta.get("polygons")
            return cls(
                text=text,
                gt=gt,
                width=float(meta["width"]),
                height=float(meta["height"]),
                gt_polygons=None if polys is None else tuple(tuple(map(tuple, p)) for p in polys),
                size=meta.get("size"),
                multi=meta.get("multi"),
                kind=meta.get("type"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"referring meta {dict(meta)!r}: {type(e).__name__}: {e}") from e

    def gt_points(self) -> list[Points]:
        if not (self.width > 0 and self.height > 0):
            raise DataError(f"referring item with image size {self.width} x {self.height}: must be positive")
        if self.gt_polygons is not None:
            return list(self.gt_polygons)
        return [b.polygon(self.width, self.height) for b in self.gt]


def _referring_summary(rows: list[tuple[int, int, int, list[int]]], thresholds: Sequence[float]) -> dict:
    """rows: (n_gt, n_pred, unparsed, matched per threshold) of each item in the group."""
    n_gt = sum(r[0] for r in rows)
    n_pred = sum(r[1] for r in rows)
    out: dict[str, Any] = {"n_items": len(rows), "n_gt": n_gt, "n_pred": n_pred}
    for k, t in enumerate(thresholds):
        matched = sum(r[3][k] for r in rows)
        out[f"acc@{t:g}"] = matched / n_gt if n_gt else None
        out[f"precision@{t:g}"] = matched / n_pred if n_pred else None
    out["unparsed"] = sum(r[2] for r in rows)
    return out


def referring_metrics(items: Iterable[ReferringItem], thresholds: Sequence[float] = (0.5, 0.25)) -> dict:
    """acc@t = matched gt boxes / all gt boxes (:func:`match_count`), overall and broken down.

    Returns ``{"acc@0.5", "acc@0.25", "precision@0.5", "precision@0.25", "n_items", "n_gt", "n_pred",
    "unparsed", "by_size": {label: {...}}, "by_objects": {"single"|"multi": {...}}, "by_type": {...},
    "size_thresholds"}``. An output with no parseable box is counted in ``unparsed`` and matches
    nothing. Precision (matched / predicted boxes) exposes outputs that spray boxes.
    """
    rows: list[tuple[int, int, int, list[int]]] = []
    groups: dict[str, dict[str, list[int]]] = {"by_size": {}, "by_objects": {}, "by_type": {}}
    for item in items:
        gt = item.gt_points()
        pred_boxes = parse_boxes(item.text) if isinstance(item.text, str) else []
        ious = iou_matrix([b.polygon(item.width, item.height) for b in pred_boxes], gt)
        i = len(rows)
        matched = [match_count(ious, t) for t in thresholds]
        rows.append((len(gt), len(pred_boxes), int(not pred_boxes), matched))
        size = item.size or (object_size(gt, item.width, item.height) if gt else "none")
        multi = item.multi if item.multi is not None else len(gt) > 1
        groups["by_size"].setdefault(str(size).lower(), []).append(i)
        groups["by_objects"].setdefault("multi" if multi else "single", []).append(i)
        if item.kind is not None:
            groups["by_type"].setdefault(str(item.kind), []).append(i)
    out = _referring_summary(rows, thresholds)
    for name, by in groups.items():
        out[name] = {
            k: _referring_summary([rows[i] for i in idx], thresholds) for k, idx in sorted(by.items())
        }
    out["size_thresholds"] = dict(SIZE_THRESHOLDS)
    return out


# ------------------------------------------------------------------------------------- region captions

def caption_metrics(
    preds: Sequence[str], refs: Sequence[Sequence[str]], *, meteor: MeteorScorer | None = None
) -> dict:
    """ROUGE-1 and ROUGE-L F-measures (rouge-score, Porter stemming, best over references, mean over
    captions) and METEOR 1.5 (pycocoevalcap's Java METEOR, synonyms and paraphrases on).

    ``meteor`` is the corpus-level score the COCO toolkit reports; ``meteor_mean`` the mean of
    per-caption scores. Pass a running :class:`MeteorScorer` to reuse its JVM; otherwise one is started
    and closed within this call. Empty predictions score 0 and are counted in ``empty``.
    """
    from rouge_score import rouge_scorer

    n = _check_lengths(preds=preds, refs=refs)
    clean_refs: list[list[str]] = []
    for i, rs in enumerate(refs):
        if isinstance(rs, str):
            rs = [rs]
        kept = [r for r in rs if isinstance(r, str) and r.strip()]
        if not kept:
            raise DataError(f"caption #{i}: no non-empty reference caption (got {rs!r})")
        clean_refs.append(kept)
    clean_preds = [p if isinstance(p, str) else "" for p in preds]
    out: dict[str, Any] = {"n": n, "empty": sum(not p.strip() for p in clean_preds)}
    if n == 0:
        return {**out, "rouge1": None, "rougeL": None, "meteor": None, "meteor_mean": None}
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    r1 = rl = 0.0
    for p, rs in zip(clean_preds, clean_refs, strict=True):
        s = scorer.score_multi(rs, p)
        r1 += s["rouge1"].fmeasure
        rl += s["rougeL"].fmeasure
    own = meteor is None
    m = MeteorScorer() if own else meteor
    try:
        corpus, per = m.score(clean_preds, clean_refs)
    finally:
        if own:
            m.close()
    return {**out, "rouge1": r1 / n, "rougeL": rl / n, "meteor": corpus, "meteor_mean": sum(per) / n}
