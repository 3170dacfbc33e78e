"""The ``report`` stage: the paper's tables for every evaluated model side by side, and its figures.

Reads (paths relative to ``root``, the repository root)::

    metrics/<model>.json                      evaluate's summary (headline + scalars; what DVC tracks)
    reports/eval/<model>/metrics.json         evaluate's full details (preferred when present)
    reports/eval/<model>/predictions.jsonl    every prediction (the referring ones feed the box figure)
    reports/eval/student_kd/confusion.png     the distilled student's confusion matrix
    dvclive/<run>/plots/metrics/*.tsv         training curves; dvclive/<run>/metrics.json final values

Writes ``reports/report.md`` and ``reports/figures/{grounding,losses,confusion_student_kd}.png``.

Models are reported in the order teacher, student_sft, student_control, student_kd; one that has not
been evaluated is skipped and named. The "what distillation adds" paragraph is generated from the
numbers (signs, sizes, and a noise band from the number of test items), never written in advance.
Plots use matplotlib's Agg canvas directly (``Figure``), never pyplot, so no global backend is touched.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geodistill.data.records import parse_boxes, parse_phrases
from geodistill.errors import DataError

MODELS = ("teacher", "student_sft", "student_control", "student_kd")
"""Reported models, in table order (the pipeline's ``evaluate`` foreach)."""
RUNS = ("teacher", "student_sft", "student_control", "distill")
"""dvclive folders with training curves (``distill`` trains student_kd)."""
DISTILL_TERMS = ("kl", "align", "pt", "ce")
"""Loss terms distill logs besides ``loss``; each gets its own panel when present."""
FIGURES = ("grounding.png", "losses.png", "confusion_student_kd.png")
"""Figures this module owns under reports/figures (stale ones are removed first)."""

_GT_COLOUR = "#00d000"
_PRED_COLOUR = "#ff2020"
_RUN_COLOURS = {
    "teacher": "#1f77b4",
    "student_sft": "#ff7f0e",
    "student_control": "#7f7f7f",
    "distill": "#d62728",
}


# --------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class ModelResults:
    """The evaluation of one model as the report reads it."""

    name: str
    metrics: Mapping[str, Any]
    """Full details when present, else the DVC summary (scalars only: enough for every table)."""
    source: str
    """Which file ``metrics`` came from (for the report's sources list)."""
    eval_dir: Path
    """reports/eval/<model>: predictions.jsonl and confusion.png (either may be missing)."""
    warnings: tuple[str, ...] = ()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e}); re-run the stage that writes it") from e
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _get(d: Mapping[str, Any] | None, *keys: str) -> Any:
    """``d[k1][k2]...`` or None when any level is missing."""
    for k in keys:
        if not isinstance(d, Mapping) or k not in d:
            return None
        d = d[k]
    return d


@dataclass(frozen=True)
class Headline:
    """One headline metric: where it lives in a model's metrics and how many items it is over."""

    label: str
    keys: tuple[str, ...]
    n_keys: tuple[str, ...]
    summary_key: str
    """Its name in the summary's flat ``headline`` (eval.run.headline)."""

    def value(self, m: Mapping[str, Any]) -> float | None:
        v = _get(m, *self.keys)
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

    def n(self, m: Mapping[str, Any]) -> int | None:
        v = _get(m, *self.n_keys)
        return int(v) if isinstance(v, int) else None


HEADLINE = (
    Headline("scene OA", ("scene", "OA"), ("scene", "n"), "scene_OA"),
    Headline("scene AA", ("scene", "AA"), ("scene", "n"), "scene_AA"),
    Headline("VQA mOA", ("vqa", "mOA"), ("vqa", "n_total"), "vqa_mOA"),
    Headline("grounding acc@0.5", ("grounding", "acc@0.5"), ("grounding", "n_items"), "grounding_acc@0.5"),
    Headline("grounding acc@0.25", ("grounding", "acc@0.25"), ("grounding", "n_items"), "grounding_acc@0.25"),
    Headline("caption ROUGE-1", ("captioning", "rouge1"), ("captioning", "n"), "caption_rouge1"),
    Headline("caption ROUGE-L", ("captioning", "rougeL"), ("captioning", "n"), "caption_rougeL"),
    Headline("caption METEOR", ("captioning", "meteor"), ("captioning", "n"), "caption_meteor"),
)


def load_results(root: Path, models: Sequence[str] = MODELS) -> tuple[list[ModelResults], list[str]]:
    """The evaluated models (in ``models`` order) and the names of those with no metrics at all."""
    found, missing = [], []
    for name in models:
        summary_file = root / "metrics" / f"{name}.json"
        eval_dir = root / "reports" / "eval" / name
        details_file = eval_dir / "metrics.json"
        summary = _read_json(summary_file) if summary_file.is_file() else None
        details = _read_json(details_file) if details_file.is_file() else None
        if summary is None and details is None:
            missing.append(name)
            continue
        warnings = []
        if summary is not None and details is not None:
            # Both come from one evaluate run; disagreement means one of them is stale.
            stale = [
                h.label
                for h in HEADLINE
                if not _close(_get(summary, "headline", h.summary_key), h.value(details))
            ]
            if stale:
                warnings.append(
                    f"{summary_file.relative_to(root)} and {details_file.relative_to(root)} disagree on "
                    f"{', '.join(stale)}: one is stale; re-run `dvc repro evaluate@{name}`"
                )
        use, source = (details, details_file) if details is not None else (summary, summary_file)
        assert use is not None  # for the type checker: one of the two exists
        found.append(ModelResults(name, use, str(source.relative_to(root)), eval_dir, tuple(warnings)))
    return found, missing


def _close(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)


# ------------------------------------------------------------------------------------------ formatting


def pct(x: Any) -> str:
    """A fraction as a percentage with one decimal; '–' when missing."""
    return f"{100 * float(x):.1f}" if isinstance(x, int | float) and not isinstance(x, bool) else "–"


def si(x: Any, unit: str = "") -> str:
    """A count with an SI prefix (3085504 -> '3.09 M'); '–' when missing."""
    if not isinstance(x, int | float) or isinstance(x, bool):
        return "–"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.2f} {prefix}{unit}"
    return f"{x:g} {unit}".strip()


def num(x: Any, fmt: str = ".3g") -> str:
    return format(float(x), fmt) if isinstance(x, int | float) and not isinstance(x, bool) else "–"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table (first column left-aligned, the rest right-aligned)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join([":--"] + ["--:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _ordered(keys: Iterable[str], first: Sequence[str]) -> list[str]:
    keys = set(keys)
    return [k for k in first if k in keys] + sorted(keys - set(first))


def _n(x: Any) -> str:
    return str(x) if isinstance(x, int) else "–"


# -------------------------------------------------------------------------------------------- tables


def scene_table(results: Sequence[ModelResults]) -> str:
    rows = []
    for r in results:
        s = r.metrics.get("scene")
        rows.append(
            [r.name, _n(_get(s, "n")), pct(_get(s, "OA")), pct(_get(s, "AA")), _n(_get(s, "unparsed"))]
        )
    return table(["model", "n", "OA", "AA", "no class named"], rows)


def vqa_table(results: Sequence[ModelResults]) -> str:
    qtypes = _ordered(
        (t for r in results for t in (_get(r.metrics, "vqa", "accuracy") or {})),
        ("presence", "comparison", "rural_urban", "count"),
    )
    rows = []
    for r in results:
        v = r.metrics.get("vqa")
        acc = _get(v, "accuracy") or {}
        rows.append([r.name, _n(_get(v, "n_total")), *(pct(acc.get(t)) for t in qtypes),
                     pct(_get(v, "mOA")), pct(_get(v, "OA"))])  # fmt: skip
    return table(["model", "n", *qtypes, "mOA", "OA"], rows)


def grounding_table(results: Sequence[ModelResults]) -> str:
    sizes = _ordered((k for r in results for k in (_get(r.metrics, "grounding", "by_size") or {})),
                     ("small", "medium", "large"))  # fmt: skip
    objects = _ordered((k for r in results for k in (_get(r.metrics, "grounding", "by_objects") or {})),
                       ("single", "multi"))  # fmt: skip
    kinds = sorted({k for r in results for k in (_get(r.metrics, "grounding", "by_type") or {})})
    rows = []
    for r in results:
        g = r.metrics.get("grounding")
        row = [r.name, _n(_get(g, "n_items")), pct(_get(g, "acc@0.5")), pct(_get(g, "acc@0.25"))]
        row += [pct(_get(g, "by_size", k, "acc@0.5")) for k in sizes]
        row += [pct(_get(g, "by_objects", k, "acc@0.5")) for k in objects]
        row += [pct(_get(g, "by_type", k, "acc@0.5")) for k in kinds]
        row.append(_n(_get(g, "unparsed")))
        rows.append(row)
    return table(["model", "n", "acc@0.5", "acc@0.25", *sizes, *objects, *kinds, "no box"], rows)


def caption_table(results: Sequence[ModelResults]) -> str:
    rows = []
    for r in results:
        c = r.metrics.get("captioning")
        rows.append([r.name, _n(_get(c, "n")), pct(_get(c, "rouge1")), pct(_get(c, "rougeL")),
                     pct(_get(c, "meteor")), _n(_get(c, "empty"))])  # fmt: skip
    return table(["model", "n", "ROUGE-1", "ROUGE-L", "METEOR", "empty"], rows)


def efficiency_table(results: Sequence[ModelResults]) -> str:
    rows = []
    for r in results:
        e = r.metrics.get("efficiency")
        flops = si(_get(e, "flops_per_sample"))
        new = _get(e, "new_tokens")
        if flops != "–" and isinstance(new, int):
            flops += f" ({new} new tok)"  # FLOPs grow with the answer length: say which length
        latency = _get(e, "latency_s")
        rows.append([
            r.name, si(_get(e, "params", "total")), si(_get(e, "params", "language_model")), flops,
            num(latency * 1000, ".1f") if isinstance(latency, int | float) else "–",
            num(_get(e, "tokens_per_s"), ".1f"), num(_get(e, "peak_memory_mb"), ".0f"),
            str(_get(e, "device") or "–"),
        ])  # fmt: skip
    return table(
        ["model", "params (total)", "params (LLM)", "FLOPs / sample", "latency (ms)", "tokens/s",
         "peak memory (MB)", "device"],
        rows,
    )  # fmt: skip


# ------------------------------------------------------------------------------- what distillation adds


@dataclass(frozen=True)
class Delta:
    """a - b on one headline metric, in percentage points, with a noise band from the item counts."""

    label: str
    diff: float
    band: float
    n: int | None

    @property
    def verdict(self) -> str:
        if abs(self.diff) < 0.05:
            return "same"
        if self.band and abs(self.diff) <= self.band:
            return "within noise"
        return "higher" if self.diff > 0 else "lower"


def noise_band(a: float, b: float, n_a: int | None, n_b: int | None) -> float:
    """Two standard errors (percentage points) of the difference of two scores in [0, 1] over n items.

    Uses the unpaired bound sqrt(a(1-a)/n_a + b(1-b)/n_b): exact for accuracies of independent models,
    conservative for paired ones (same items, positively correlated errors), and an upper bound for
    ROUGE/METEOR (a variable in [0, 1] with mean m has variance <= m(1-m)). Infinite without counts.
    """
    if not n_a or not n_b:
        return math.inf
    a, b = min(max(a, 0.0), 1.0), min(max(b, 0.0), 1.0)
    return 200 * math.sqrt(a * (1 - a) / n_a + b * (1 - b) / n_b)


def deltas(a: ModelResults, b: ModelResults) -> list[Delta]:
    out = []
    for h in HEADLINE:
        va, vb = h.value(a.metrics), h.value(b.metrics)
        if va is None or vb is None:
            continue
        na, nb = h.n(a.metrics), h.n(b.metrics)
        out.append(Delta(h.label, 100 * (va - vb), noise_band(va, vb, na, nb), na))
    return out


def _signed(d: Delta) -> str:
    band = "n unknown" if math.isinf(d.band) else f"noise ±{d.band:.1f}"
    return f"{d.label} {d.diff:+.1f} points ({band})"


def _join(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def comparison_sentence(a: str, b: str, ds: Sequence[Delta], why: str) -> str:
    """One generated sentence: where ``a`` beats / trails ``b`` beyond noise, and how many are within."""
    up = [_signed(d) for d in ds if d.verdict == "higher"]
    down = [_signed(d) for d in ds if d.verdict == "lower"]
    flat = [d for d in ds if d.verdict in ("same", "within noise")]
    parts = []
    if up:
        parts.append(f"higher beyond noise on {_join(up)}")
    if down:
        parts.append(f"lower beyond noise on {_join(down)}")
    if flat:
        names = _join([d.label for d in flat])
        parts.append(f"the same or within noise on {names} ({len(flat)} of {len(ds)})")
    return f"Against {b} ({why}), {a} is " + "; ".join(parts) + "."


def distillation_paragraph(results: Sequence[ModelResults]) -> str:
    """The generated 'what distillation adds' section (deltas table + sentences)."""
    by = {r.name: r for r in results}
    kd = by.get("student_kd")
    if kd is None:
        return "student_kd has not been evaluated, so there is nothing to compare yet."
    lines = []
    comparisons = [
        ("student_control", "the equal-compute control: same initialisation and extra steps, no teacher"),
        ("student_sft", "the baseline it started from"),
    ]
    rows: dict[str, dict[str, Delta]] = {}
    for other, why in comparisons:
        if other not in by:
            lines.append(f"{other} has not been evaluated: no comparison against {why.split(':')[0]}.")
            continue
        ds = deltas(kd, by[other])
        rows[other] = {d.label: d for d in ds}
        if ds:
            lines.append(comparison_sentence("student_kd", other, ds, why))
    if "student_control" not in by and "student_sft" in by:
        lines.append(
            "Without the control, a gain over student_sft cannot be told apart from the extra training "
            "steps alone."
        )
    if "teacher" in by and "student_sft" in by:
        gap = {d.label: d for d in deltas(by["teacher"], by["student_sft"])}
        ahead = [lab for lab, d in gap.items() if d.verdict == "higher"]
        if not ahead:
            lines.append(
                "The teacher is not ahead of student_sft beyond noise on any headline metric, so there is "
                "little it can transfer: distillation should not be expected to beat the control here."
            )
        else:
            closed = []
            for lab in ahead:
                d = rows.get("student_sft", {}).get(lab)
                if d is not None:
                    closed.append(f"{lab} {100 * d.diff / gap[lab].diff:.0f}%")
            lines.append(
                f"The teacher leads student_sft beyond noise on {_join(ahead)}"
                + (f"; student_kd closes this share of that gap: {_join(closed)}." if closed else ".")
            )
    control = rows.get("student_control")
    if control:
        up = [lab for lab, d in control.items() if d.verdict == "higher"]
        down = [lab for lab, d in control.items() if d.verdict == "lower"]
        if up and not down:
            verdict = f"distillation adds measurable quality over equal compute on {_join(up)}."
        elif down and not up:
            verdict = f"distillation does worse than equal compute on {_join(down)}."
        elif up and down:
            verdict = f"mixed: better than equal compute on {_join(up)}, worse on {_join(down)}."
        else:
            verdict = (
                "no difference between distillation and equal compute is resolvable at these test sizes."
            )
        lines.append("In short: " + verdict)
    counts, tasks = [], set()
    for h in HEADLINE:  # one count per task: the metrics of a task share their items
        n = h.n(kd.metrics)
        if n is not None and h.keys[0] not in tasks:
            tasks.add(h.keys[0])
            counts.append(f"{h.keys[0]} {n}")
    if counts:
        lines.append(
            "Test items per task for student_kd: " + ", ".join(counts) + ". The noise band is two standard "
            "errors of an unpaired difference of proportions (conservative for these paired comparisons, "
            "an upper bound for ROUGE/METEOR); differences inside it are not evidence either way."
        )
    header = ["metric", *(f"student_kd − {o}" for o in rows), "n"]
    trows = []
    for h in HEADLINE:
        cells = [rows[o].get(h.label) for o in rows]
        if all(c is None for c in cells):
            continue
        n = next((c.n for c in cells if c is not None), None)
        trows.append([h.label, *(f"{c.diff:+.1f} ± {c.band:.1f}" if c else "–" for c in cells), _n(n)])
    parts = [table(header, trows)] if rows and trows else []
    return "\n\n".join([*parts, " ".join(lines)])


# ------------------------------------------------------------------------------------------ figures


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)  # attaches the Agg canvas: savefig works without pyplot
    return fig


def read_predictions(path: Path, task: str) -> list[dict[str, Any]]:
    """The rows of one task in a predictions.jsonl (empty when the file is missing)."""
    if not path.is_file():
        return []
    rows = []
    with path.open() as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {i}: not valid JSON ({e}); re-run the evaluate stage") from e
            if row.get("task") == task:
                rows.append(row)
    return rows


def pick_examples(rows: Sequence[Mapping[str, Any]], k: int) -> list[Mapping[str, Any]]:
    """Up to ``k`` rows, first one of each (size, single/multi) kind in file order, then the next ones."""
    chosen: list[Mapping[str, Any]] = []
    kinds: set[tuple[Any, Any]] = set()
    for row in rows:
        meta = row.get("meta") or {}
        kind = (meta.get("size"), meta.get("multi"))
        if kind not in kinds and len(chosen) < k:
            kinds.add(kind)
            chosen.append(row)
    for row in rows:
        if len(chosen) >= k:
            break
        if all(row is not c for c in chosen):
            chosen.append(row)
    order = {id(r): i for i, r in enumerate(rows)}
    return sorted(chosen, key=lambda r: order[id(r)])


def _gt_polygons(meta: Mapping[str, Any]) -> list[list[tuple[float, float]]]:
    polys = meta.get("polygons")
    if polys is not None:  # GeoChat-Bench's exact corners win over the 0-100 grid boxes
        return [[(float(x), float(y)) for x, y in p] for p in polys]
    w, h = float(meta["width"]), float(meta["height"])
    return [b.polygon(w, h) for s in meta.get("boxes", []) for b in parse_boxes(s)]


def _load_image(root: Path, path: str):
    from PIL import Image

    p = Path(path)
    p = p if p.is_absolute() else root / p
    if not p.is_file():
        return None
    with Image.open(p) as im:
        return im.convert("RGB")


def grounding_figure(
    root: Path, results: Sequence[ModelResults], out: Path, *, n_images: int = 4
) -> tuple[Path | None, str]:
    """Fig. 5-style grid: one row per test image, one column per model; ground truth and the model's
    predicted boxes drawn as (rotated) polygons. Returns (the PNG or None, a sentence for the report)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Polygon as Patch

    preds = {r.name: {p["id"]: p for p in read_predictions(r.eval_dir / "predictions.jsonl", "referring")}
             for r in results}  # fmt: skip
    models = [r.name for r in results if preds[r.name]]
    if not models:
        return None, "No referring predictions (predictions.jsonl) were found, so there is no box figure."
    # Only items every shown model answered, so each row compares like with like.
    common = set.intersection(*(set(preds[m]) for m in models))
    rows = pick_examples([p for i, p in preds[models[0]].items() if i in common], n_images)
    if not rows:
        return None, "The models answered no referring item in common, so there is no box figure."
    fig = _new_figure(2.4 * len(models) + 0.6, 2.4 * len(rows) + 0.8)
    axes = fig.subplots(len(rows), len(models), squeeze=False)
    for i, item in enumerate(rows):
        meta = item.get("meta") or {}
        w, h = float(meta.get("width", 100)), float(meta.get("height", 100))
        image = _load_image(root, item["image"])
        gt = _gt_polygons(meta)
        phrases = parse_phrases(item.get("question", ""))
        for j, name in enumerate(models):
            ax = axes[i][j]
            if image is not None:
                ax.imshow(image, extent=(0, w, h, 0))  # pixel coordinates of the boxes' image size
            else:
                ax.set_facecolor("#dddddd")
                ax.text(w / 2, h / 2, "image not found", ha="center", va="center", fontsize=7)
            for poly in gt:
                ax.add_patch(Patch(poly, closed=True, fill=False, edgecolor=_GT_COLOUR, linewidth=2))
            text = preds[name][item["id"]].get("prediction", "")
            boxes = parse_boxes(text) if isinstance(text, str) else []
            for b in boxes:
                ax.add_patch(Patch(b.polygon(w, h), closed=True, fill=False, edgecolor=_PRED_COLOUR,
                                   linewidth=1.5, linestyle="--"))  # fmt: skip
            if not boxes:
                ax.text(0.5, 0.04, "no box", transform=ax.transAxes, ha="center", va="bottom", fontsize=7,
                        color="white", bbox={"facecolor": "black", "alpha": 0.6, "pad": 1})  # fmt: skip
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
            if j == 0:
                label = phrases[0] if phrases else str(item["id"])
                ax.set_ylabel(label if len(label) <= 28 else label[:27] + "…", fontsize=8)
    handles = [
        Line2D([], [], color=_GT_COLOUR, linewidth=2, label="ground truth"),
        Line2D([], [], color=_PRED_COLOUR, linewidth=1.5, linestyle="--", label="prediction"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=110)
    skipped = [r.name for r in results if not preds[r.name]]
    note = f" ({_join(skipped)}: no referring predictions)" if skipped else ""
    return out, f"{len(rows)} referring test items, ground truth in green, predictions dashed red{note}."


def read_tsv(path: Path) -> tuple[list[float], list[float]]:
    """(steps, values) of a dvclive plots/metrics TSV (columns ``[timestamp] step <name>``)."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        return [], []
    header = lines[0].split("\t")
    if "step" not in header or len(header) < 2:
        raise DataError(f"{path}: expected a dvclive TSV with a 'step' column, got header {header}")
    xi = header.index("step")
    yi = header.index(path.stem) if path.stem in header else len(header) - 1
    xs, ys = [], []
    for n, line in enumerate(lines[1:], 2):
        cells = line.split("\t")
        try:
            xs.append(float(cells[xi]))
            ys.append(float(cells[yi]))
        except (IndexError, ValueError) as e:
            raise DataError(f"{path}, line {n}: not a number row ({line!r})") from e
    return xs, ys


def losses_figure(root: Path, out: Path) -> tuple[Path | None, list[str]]:
    """Training curves: one panel with every run's loss, one per distill loss term. Returns (the PNG or
    None, runs without logs)."""
    curves: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    missing = []
    for run in RUNS:
        folder = root / "dvclive" / run / "plots" / "metrics"
        if not folder.is_dir():
            missing.append(run)
            continue
        curves[run] = {f.stem: read_tsv(f) for f in sorted(folder.glob("*.tsv"))}
    terms = [t for t in DISTILL_TERMS if t in curves.get("distill", {})]
    if not any("loss" in c for c in curves.values()) and not terms:
        return None, missing
    panels: list[tuple[str, Callable[[Any], None]]] = []

    def plot_loss(ax: Any) -> None:
        for run, c in curves.items():
            colour = _RUN_COLOURS.get(run)
            if "loss" in c:
                ax.plot(*c["loss"], label=run, color=colour, linewidth=1.2)
            if "val_loss" in c:
                ax.plot(*c["val_loss"], label=f"{run} (val)", color=colour, linestyle="--", linewidth=1)

    panels.append(("loss (distill: the weighted total)", plot_loss))

    def plot_term(ax: Any, term: str) -> None:
        ax.plot(*curves["distill"][term], color=_RUN_COLOURS["distill"], label="distill")
        if term == "ce" and "ce" in curves.get("student_control", {}):
            # The control trains on the same data for the same steps without a teacher: its CE is
            # the curve distill's CE should be read against.
            ax.plot(*curves["student_control"]["ce"], color=_RUN_COLOURS["student_control"],
                    label="student_control")  # fmt: skip
            ax.legend(fontsize=7)

    for t in terms:
        panels.append((f"distill: {t}", lambda ax, t=t: plot_term(ax, t)))
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig = _new_figure(4.0 * cols, 3.0 * nrows)
    axes = fig.subplots(nrows, cols, squeeze=False)
    for k, ax in enumerate(a for row in axes for a in row):
        if k >= len(panels):
            ax.set_visible(False)
            continue
        title, draw = panels[k]
        draw(ax)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if k == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=110)
    return out, missing


def training_table(root: Path) -> str | None:
    """Final logged values of each run (dvclive/<run>/metrics.json)."""
    rows = []
    for run in RUNS:
        f = root / "dvclive" / run / "metrics.json"
        if not f.is_file():
            continue
        m = _read_json(f)
        rows.append([run, _n(m.get("step")), num(m.get("loss"), ".4g"), num(m.get("val_loss"), ".4g"),
                     pct(m.get("val_token_acc"))])  # fmt: skip
    return table(["run", "steps", "last loss", "val loss", "val token acc"], rows) if rows else None


# ------------------------------------------------------------------------------------------------ main


def write_report(root: Path = Path("."), models: Sequence[str] = MODELS) -> Path:
    """Write ``reports/report.md`` and its figures under ``root``; returns the report's path."""
    root = Path(root)
    reports = root / "reports"
    figures = reports / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for name in FIGURES:  # a figure that cannot be drawn this time must not survive from an older run
        (figures / name).unlink(missing_ok=True)
    results, missing = load_results(root, models)
    md = ["# geodistill: evaluation report", ""]
    if results:
        split = {str(r.metrics.get("split")) for r in results if r.metrics.get("split")}
        md.append(
            f"Models: {', '.join(r.name for r in results)}"
            + (f" (split: {', '.join(sorted(split))})" if split else "")
            + ". Accuracies and caption scores in %; n = test items per model."
        )
    else:
        md.append("No model has been evaluated yet (no metrics/<model>.json or reports/eval/<model>/).")
    if missing:
        md.append(f"Not evaluated, skipped: {', '.join(missing)}.")
    for r in results:
        md += [f"> warning: {w}" for w in r.warnings]
    if results:
        md += ["", "## Scene classification", "", scene_table(results)]
        md += ["", "## VQA (accuracy per question type; mOA = mean over types)", "", vqa_table(results)]
        md += ["", "## Grounding (referring)", "",
               "acc@t = ground-truth boxes matched one-to-one at IoU >= t (rotated boxes); the size, "
               "single/multi and type columns are acc@0.5.", "", grounding_table(results)]  # fmt: skip
        md += ["", "## Region captioning", "", caption_table(results)]
        md += ["", "## Efficiency", "",
               "Parameters, FLOPs of one sample (prefill + greedy decode of the stated number of new "
               "tokens), batch-1 latency and decode speed, process peak memory.", "",
               efficiency_table(results)]  # fmt: skip
        md += ["", "## What distillation adds", "", distillation_paragraph(results)]

    md += ["", "## Figures", ""]
    kd_confusion = root / "reports" / "eval" / "student_kd" / "confusion.png"
    if kd_confusion.is_file():
        shutil.copyfile(kd_confusion, figures / "confusion_student_kd.png")
        md += ["Scene classification confusion matrix of student_kd:", "",
               "![student_kd confusion matrix](figures/confusion_student_kd.png)", ""]  # fmt: skip
    else:
        md += ["No confusion matrix of student_kd (reports/eval/student_kd/confusion.png is missing).", ""]
    fig, note = grounding_figure(root, results, figures / "grounding.png")
    md += ["Grounding examples: " + note, ""]
    if fig is not None:
        md += ["![grounding examples](figures/grounding.png)", ""]
    fig, no_logs = losses_figure(root, figures / "losses.png")
    if fig is not None:
        md += ["Training curves" + (f" ({_join(no_logs)}: no dvclive logs)" if no_logs else "") + ":", "",
               "![training curves](figures/losses.png)", ""]  # fmt: skip
    else:
        md += ["No training curves (no dvclive/<run>/plots/metrics/*.tsv).", ""]
    final = training_table(root)
    if final:
        md += ["Final values logged by each training run:", "", final, ""]
    md += ["Sources: " + "; ".join(f"{r.name}: {r.source}" for r in results) if results else "Sources: none"]
    out = reports / "report.md"
    out.write_text("\n".join(md).rstrip() + "\n")
    return out
