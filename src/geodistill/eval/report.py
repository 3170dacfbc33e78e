"""The ``report`` stage: the paper's tables for every evaluated model side by side, and its figures.

Reads evaluate's outputs and the training logs (:mod:`geodistill.eval.results`); writes
``reports/report.md`` and ``reports/figures/{referring,losses,confusion_student_kd_<set>}.png``.

Models are reported in the order teacher, student_sft, student_control, student_kd; one that has not
been evaluated is skipped and named. A task with no evaluation items says why and which param gives it
a set; skipped bad items are counted per model. The tables are :mod:`~geodistill.eval.tables`, the
generated comparison :mod:`~geodistill.eval.compare`, the figures :mod:`~geodistill.eval.figures`.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from geodistill.eval import tables
from geodistill.eval.compare import distillation_paragraph
from geodistill.eval.figures import losses_figure, referring_figure
from geodistill.eval.results import (
    MODELS,
    ModelResults,
    final_training_values,
    load_results,
    lookup,
    training_curves,
)
from geodistill.eval.tasks import EVAL_TASKS

FIGURES = ("referring.png", "losses.png", "confusion_student_kd*.png")
"""Figures this module owns under reports/figures, as glob patterns (stale ones are removed first)."""


def _intro(results: Sequence[ModelResults], missing: Sequence[str]) -> list[str]:
    """Which models, which split, warnings, and what the evaluation sets held."""
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
    notes = dict.fromkeys(  # one line per distinct reason, in task order
        n
        for t in EVAL_TASKS
        for r in results
        for s in (lookup(r.metrics, "sets", t) or {}).values()
        if isinstance(s, dict) and (n := s.get("note"))
    )
    if notes:
        md += ["", "Tasks without evaluation items (their tables are dashes):", ""]
        md += [f"- {n}" for n in notes]
    sets = tables.sets_table(results)
    if sets:
        md += ["", "Evaluation items per task (bad items skipped under eval on_error: skip):", "", sets]
    return md


def _tables(results: Sequence[ModelResults]) -> list[str]:
    md = ["", "One column group per evaluation set; 'mean' is the task's headline (mean over sets).", ""]
    md += ["## Scene classification (zero-shot)", "", tables.scene_table(results)]
    md += ["", "## VQA (accuracy per question type; mOA = mean over types)", "", tables.vqa_table(results)]
    md += ["", "## Referring (boxes)", "",
           "acc@t = ground-truth boxes matched one-to-one at IoU >= t (rotated boxes); the size, "
           "single/multi and type columns are acc@0.5.", "", tables.referring_table(results)]  # fmt: skip
    md += ["", "## Region captions", "", tables.region_caption_table(results)]
    md += ["", "## Efficiency", "",
           "Parameters, FLOPs of one sample (prefill + greedy decode of the stated number of new "
           "tokens), batch-1 latency and decode speed, process peak memory.", "",
           tables.efficiency_table(results)]  # fmt: skip
    md += ["", "## What distillation adds", "", distillation_paragraph(results)]
    return md


def _figures(root: Path, results: Sequence[ModelResults], figures: Path) -> list[str]:
    md = ["", "## Figures", ""]
    confusions = sorted((root / "reports" / "eval" / "student_kd").glob("confusion_*.png"))
    for src in confusions:
        name = src.stem.removeprefix("confusion_")
        shutil.copyfile(src, figures / f"confusion_student_kd_{name}.png")
        figure = f"figures/confusion_student_kd_{name}.png"
        md += [f"Scene classification confusion matrix of student_kd on {name}:", "",
               f"![student_kd confusion matrix, {name}]({figure})", ""]  # fmt: skip
    if not confusions:
        md += ["No confusion matrix of student_kd (no reports/eval/student_kd/confusion_<set>.png).", ""]
    fig, note = referring_figure(root, results, figures / "referring.png")
    md += ["Referring examples: " + note, ""]
    if fig is not None:
        md += ["![referring examples](figures/referring.png)", ""]
    curves, no_logs = training_curves(root)
    if losses_figure(curves, figures / "losses.png") is not None:
        md += ["Training curves" + (f" ({tables.join(no_logs)}: no dvclive logs)" if no_logs else "") + ":",
               "", "![training curves](figures/losses.png)", ""]  # fmt: skip
    else:
        md += ["No training curves (no dvclive/<model>/plots/metrics/*.tsv).", ""]
    final = tables.training_table(final_training_values(root))
    if final:
        md += ["Final values logged by each training run:", "", final, ""]
    return md


def write_report(root: Path = Path("."), models: Sequence[str] = MODELS) -> Path:
    """Write ``reports/report.md`` and its figures under ``root``; returns the report's path."""
    root = Path(root)
    reports = root / "reports"
    figures = reports / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for pattern in FIGURES:  # a figure that cannot be drawn this time must not survive from an older run
        for stale in figures.glob(pattern):
            stale.unlink()
    results, missing = load_results(root, models)
    md = _intro(results, missing)
    if results:
        md += _tables(results)
    md += _figures(root, results, figures)
    md += ["Sources: " + "; ".join(f"{r.name}: {r.source}" for r in results) if results else "Sources: none"]
    out = reports / "report.md"
    out.write_text("\n".join(md).rstrip() + "\n")
    return out
