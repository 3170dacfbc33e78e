"""The figures of the evaluation and the report: confusion matrix, referring boxes, training curves.

Plots use matplotlib's Agg canvas directly (``Figure``), never pyplot, so no global backend is touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from geodistill.data.records import parse_boxes, parse_phrases
from geodistill.errors import DataError
from geodistill.eval.metrics import OTHER
from geodistill.eval.results import Curve, ModelResults, read_predictions
from geodistill.eval.tables import join
from geodistill.files import open_image

DISTILL_TERMS = ("kl", "onpolicy_single", "onpolicy_long", "align", "pt", "ce")
"""Loss terms student_kd's training logs besides ``loss``; each gets its own panel when present (the on-policy
ones every ``distill.onpolicy.every`` steps)."""

_GT_COLOUR = "#00d000"
_PRED_COLOUR = "#ff2020"
_MODEL_COLOURS = {
    "teacher": "#1f77b4",
    "student_sft": "#ff7f0e",
    "student_control": "#7f7f7f",
    "student_kd": "#d62728",
}


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)  # attaches the Agg canvas: savefig works without pyplot
    return fig


def _save(fig: Any, out: Path, dpi: int) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=dpi)
    return out


# ------------------------------------------------------------------------------------ confusion matrix


def plot_confusion_matrix(
    cm: Sequence[Sequence[int]], classes: Sequence[str], path: str | Path, *, title: str | None = None
) -> Path:
    """Write a row-normalised confusion matrix (counts printed when it is small enough to read) as PNG.

    ``cm`` is :func:`~geodistill.eval.metrics.classification_metrics`'s ``"confusion"`` (with or without
    the :data:`~geodistill.eval.metrics.OTHER` column).
    """
    import numpy as np

    counts = np.asarray(cm, dtype=float)
    shape_ok = counts.ndim == 2 and counts.shape[0] == len(classes)
    if not (shape_ok and counts.shape[1] in (len(classes), len(classes) + 1)):
        raise ValueError(f"confusion matrix of shape {counts.shape} does not fit {len(classes)} classes")
    cols = list(classes) + ([OTHER] if counts.shape[1] > len(classes) else [])
    rows = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    side = max(4.0, 0.45 * len(cols) + 2.0)
    fig = _new_figure(side + 1.0, side)
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=8)
    ax.set_yticks(range(len(classes)), list(classes), fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    if len(cols) <= 30:  # beyond that the numbers are unreadable anyway
        for i, j in zip(*np.nonzero(counts), strict=True):
            colour = "white" if frac[i, j] > 0.5 else "black"
            ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7, color=colour)
    fig.tight_layout()
    return _save(fig, Path(path), dpi=120)


# --------------------------------------------------------------------------------------- referring boxes


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
    """The prediction's image, or None when it is gone or unreadable (the panel says so instead)."""
    p = Path(path)
    try:
        return open_image(p if p.is_absolute() else root / p)
    except DataError:
        return None


def _draw_boxes_panel(ax: Any, item: Mapping[str, Any], image: Any, prediction: Any) -> None:
    """One panel: the image, its ground-truth polygons (green) and the predicted boxes (dashed red)."""
    from matplotlib.patches import Polygon as Patch

    meta = item.get("meta") or {}
    w, h = float(meta.get("width", 100)), float(meta.get("height", 100))
    if image is not None:
        ax.imshow(image, extent=(0, w, h, 0))  # pixel coordinates of the boxes' image size
    else:
        ax.set_facecolor("#dddddd")
        ax.text(w / 2, h / 2, "image not found", ha="center", va="center", fontsize=7)
    for poly in _gt_polygons(meta):
        ax.add_patch(Patch(poly, closed=True, fill=False, edgecolor=_GT_COLOUR, linewidth=2))
    boxes = parse_boxes(prediction) if isinstance(prediction, str) else []
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


def referring_figure(
    root: Path, results: Sequence[ModelResults], out: Path, *, n_images: int = 4
) -> tuple[Path | None, str]:
    """Fig. 5-style grid: one row per test image, one column per model; ground truth and the model's
    predicted boxes drawn as (rotated) polygons. Returns (the PNG or None, a sentence for the report)."""
    from matplotlib.lines import Line2D

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
        image = _load_image(root, item["image"])
        phrases = parse_phrases(item.get("question", ""))
        for j, name in enumerate(models):
            _draw_boxes_panel(axes[i][j], item, image, preds[name][item["id"]].get("prediction", ""))
            if i == 0:
                axes[i][j].set_title(name, fontsize=9)
        label = phrases[0] if phrases else str(item["id"])
        axes[i][0].set_ylabel(label if len(label) <= 28 else label[:27] + "…", fontsize=8)
    handles = [
        Line2D([], [], color=_GT_COLOUR, linewidth=2, label="ground truth"),
        Line2D([], [], color=_PRED_COLOUR, linewidth=1.5, linestyle="--", label="prediction"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    skipped = [r.name for r in results if not preds[r.name]]
    note = f" ({join(skipped)}: no referring predictions)" if skipped else ""
    text = f"{len(rows)} referring test items, ground truth in green, predictions dashed red{note}."
    return _save(fig, out, dpi=110), text


# ------------------------------------------------------------------------------------- training curves


def _loss_panels(curves: Mapping[str, Mapping[str, Curve]]) -> list[tuple[str, Callable[[Any], None]]]:
    """(title, draw) of each panel: every model's loss, then each student_kd loss term."""

    def plot_loss(ax: Any) -> None:
        for model, c in curves.items():
            colour = _MODEL_COLOURS.get(model)
            if "loss" in c:
                ax.plot(*c["loss"], label=model, color=colour, linewidth=1.2)
            if "val_loss" in c:
                ax.plot(*c["val_loss"], label=f"{model} (val)", color=colour, linestyle="--", linewidth=1)

    def plot_term(ax: Any, term: str) -> None:
        ax.plot(*curves["student_kd"][term], color=_MODEL_COLOURS["student_kd"], label="student_kd")
        if term == "ce" and "ce" in curves.get("student_control", {}):
            # The control trains on the same data for the same steps without a teacher: its CE is
            # the curve student_kd's CE should be read against.
            ax.plot(*curves["student_control"]["ce"], color=_MODEL_COLOURS["student_control"],
                    label="student_control")  # fmt: skip
            ax.legend(fontsize=7)

    terms = [t for t in DISTILL_TERMS if t in curves.get("student_kd", {})]
    panels: list[tuple[str, Callable[[Any], None]]] = [("loss (student_kd: the weighted total)", plot_loss)]
    panels += [(f"student_kd: {t}", lambda ax, t=t: plot_term(ax, t)) for t in terms]
    return panels


def losses_figure(curves: Mapping[str, Mapping[str, Curve]], out: Path) -> Path | None:
    """Training curves (:func:`~geodistill.eval.results.training_curves`): one panel with every model's
    loss, one per student_kd loss term. Returns the PNG, or None when nothing was logged."""
    if not any("loss" in c for c in curves.values()) and not any(
        t in curves.get("student_kd", {}) for t in DISTILL_TERMS
    ):
        return None
    panels = _loss_panels(curves)
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
    return _save(fig, out, dpi=110)
