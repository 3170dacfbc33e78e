"""Evaluate one model on the paper's four tasks plus efficiency (Tables 3-8).

Each task is evaluated on one or more named sets: the prepared split's (``test.jsonl`` or
``val_eval.jsonl``, one set per ``meta["set"]``) or, per task, the real benchmarks configured in
``eval.benchmarks`` (AID and UCMerced, RSVQA-LR and -HR, GeoChat-Bench files). Every image is
checked when its set is loaded (inside its folder, decoded whole); a bad item raises a DataError
naming it, or with ``on_error="skip"`` is left out, counted in ``sets`` and listed in
``<plots>/skipped.json``. Every question is answered by batched
greedy decoding; unparseable answers count as wrong and are counted, never raised.

Output (``metrics/<model>.json``; sections named by task, :mod:`geodistill.eval.tasks`)::

    {"model", "split", "sets": {task: {set: {source, n, skipped, note}}},
     "scene": {"sets": {set: {OA, AA, per_class, confusion, rows, cols, n, unparsed}}, OA, AA, n},
     "vqa": {"sets": {set: {accuracy: {qtype: acc}, n, mOA, OA, n_total}}, mOA, n_total},
     "referring": {"sets": {set: {acc@0.5, acc@0.25, by_size, by_objects, ...}}, acc@0.5, acc@0.25, n_items},
     "region_caption": {"sets": {set: {rouge1, rougeL, meteor, n}}, rouge1, rougeL, meteor, n},
     "efficiency": {params, flops_per_sample, latency_s, ...}}

(a task's top-level numbers are the means over its sets: :func:`geodistill.eval.tasks.combine`), plus
``<plots>/predictions.jsonl`` (task, set, id, image, question, prediction, reference, meta),
``<plots>/confusion_<set>.png`` per scene set and ``<plots>/skipped.json``.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from geodistill.config import EvalConfig
from geodistill.data.records import Record
from geodistill.data.shards import read_jsonl_records
from geodistill.errors import DataError
from geodistill.eval import loaders
from geodistill.eval.figures import plot_confusion_matrix
from geodistill.eval.generate import Prompt, generate, greedy, model_inputs
from geodistill.eval.metrics import (
    ReferringItem,
    caption_metrics,
    classification_metrics,
    referring_metrics,
    vqa_metrics,
)
from geodistill.eval.tasks import EVAL_TASKS, combine, no_set_reason
from geodistill.models.checkpoints import load_for_inference
from geodistill.models.llava import count_parameters, num_image_tokens

Item = tuple[Record, Path]
"""One question and the path of its image."""

DEFAULT_SET = "main"
"""The set name of prepared records without ``meta["set"]`` (the embedded generator names its sets)."""


@dataclass(frozen=True)
class EvalSet:
    """The items of one set of one task and where they came from."""

    task: str
    name: str
    """The set's name: its report column and metric keys (``scene/<name>_OA``)."""
    source: str
    """The prepared split file or the benchmark file/folder."""
    items: list[Item]
    skipped: list[str] = field(default_factory=list)
    """Why each left-out item was bad (``on_error="skip"`` only)."""

    @property
    def note(self) -> str | None:
        """Why the set is empty, and what to do; None when it has items."""
        if self.items:
            return None
        if self.skipped:
            return f"{self.task}: every item of {self.source} was skipped as bad input (see skipped.json)"
        return no_set_reason(self.task, self.source)


Sets = dict[str, list[EvalSet]]
"""Task -> its sets, in evaluation order (a task with nothing to evaluate has one empty set and a note)."""


def _eval_set(
    task: str, name: str, source: str | Path, loaded: loaders.LoadResult, image_dir: Path
) -> EvalSet:
    items = [(r, image_dir / r.image) for r in loaded.records]
    return EvalSet(task, name, str(source), items, loaded.skipped)


def _prepared_sets(
    split_file: Path, image_root: Path, tasks: Sequence[str], on_error: loaders.OnError
) -> Sets:
    """The records of ``tasks`` in the prepared split, one set per ``meta["set"]``, checked as a
    benchmark's are."""
    checked: dict[tuple[str, str], loaders.CheckedRecords] = {}
    for rec in read_jsonl_records(split_file):
        if rec.task in tasks:
            key = (rec.task, str(rec.meta.get("set", DEFAULT_SET)))
            if key not in checked:
                checked[key] = loaders.CheckedRecords(split_file, image_root, "image", on_error)
            try:
                checked[key].add(rec.to_dict())
            except DataError as e:
                checked[key].skip(e)
    sets: Sets = {t: [] for t in tasks}
    for (task, name), c in checked.items():
        sets[task].append(_eval_set(task, name, split_file, c.result(), image_root))
    return {t: s or [EvalSet(t, DEFAULT_SET, str(split_file), [])] for t, s in sets.items()}


def _benchmark_sets(cfg: EvalConfig, on_error: loaders.OnError) -> Sets:
    """The real benchmarks configured in ``eval.benchmarks`` (a task's sets replace its prepared ones)."""
    b = cfg.benchmarks
    sets: Sets = {}
    for s in b.scene:
        res = loaders.load_scene_folder(s.dir, dataset=s.name, on_error=on_error)
        sets.setdefault("scene", []).append(_eval_set("scene", s.name, s.dir, res, Path(s.dir)))
    for v in b.vqa:
        q, a, i = loaders.rsvqa_files(v.dir, v.prefix)
        image_dir = Path(v.image_dir or v.dir)
        res = loaders.load_rsvqa(q, a, i, image_dir, on_error=on_error)
        sets.setdefault("vqa", []).append(_eval_set("vqa", v.name, q, res, image_dir))
    for r in b.referring:
        res = loaders.load_geochat_referring(r.path, r.image_dir, on_error=on_error)
        evs = _eval_set("referring", r.name, r.path, res, Path(r.image_dir))
        sets.setdefault("referring", []).append(evs)
    for c in b.region_caption:
        res = loaders.load_geochat_region_captions(c.path, c.image_dir, on_error=on_error)
        evs = _eval_set("region_caption", c.name, c.path, res, Path(c.image_dir))
        sets.setdefault("region_caption", []).append(evs)
    return sets


def load_sets(cfg: EvalConfig, prepared: Path, image_root: Path, on_error: loaders.OnError = "raise") -> Sets:
    """The evaluation sets of every task (a task's real benchmarks replace the prepared split's sets),
    at most ``cfg.limit`` items each."""
    split_file = prepared / ("test.jsonl" if cfg.split == "test" else "val_eval.jsonl")
    real = _benchmark_sets(cfg, on_error)
    from_split = [t for t in EVAL_TASKS if t not in real]
    sets = {**_prepared_sets(split_file, image_root, from_split, on_error), **real}
    if cfg.limit:
        sets = {t: [replace(s, items=s.items[: cfg.limit]) for s in ss] for t, ss in sets.items()}
    return {t: sets[t] for t in EVAL_TASKS}


def _answer(model, tok, transform, n_img: int, items: Sequence[Item], cfg: EvalConfig) -> list[str]:
    prompts = [Prompt(rec.conversations[:1], path) for rec, path in items]
    bar = tqdm(total=len(prompts), unit="q", leave=False)
    answers, _ = generate(
        model, tok, transform, n_img, prompts, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
        progress=bar.update,
    )  # fmt: skip
    bar.close()
    return answers


def score(
    task: str, answers: list[str], records: list[Record], plots: Path, name: str, set_name: str
) -> dict:
    """One set's metrics from the model's answers (scene also draws ``plots/confusion_<set>.png``)."""
    if task == "scene":
        classes = list(records[0].meta["classes"])
        m = classification_metrics(answers, [r.meta["label"] for r in records], classes)
        title = f"{name}: scene classification, {set_name}"
        plot_confusion_matrix(m["confusion"], m["rows"], plots / f"confusion_{set_name}.png", title=title)
        return m
    if task == "vqa":
        return vqa_metrics(answers, [r.answers[0] for r in records], [r.meta["qtype"] for r in records])
    if task == "referring":
        items = (ReferringItem.from_meta(a, r.meta) for a, r in zip(answers, records, strict=True))
        return referring_metrics(items)
    if task == "region_caption":
        return caption_metrics(answers, [list(r.meta.get("refs", r.answers[:1])) for r in records])
    raise ValueError(f"unknown evaluation task {task!r}; expected one of {EVAL_TASKS}")


FIXED_NEW_TOKENS = 16
"""Decode length forced when measuring FLOPs, latency and tokens/s, so models compare at equal work."""


@torch.inference_mode()
def efficiency(model, tok, transform, n_img: int, items: Sequence[Item], cfg: EvalConfig) -> dict:
    """Table 8: parameters, FLOPs per sample (prefill + FIXED_NEW_TOKENS decode steps, counted by
    torch.utils.flop_counter), batch-1 latency and tokens/s at that decode length, and peak memory
    (CUDA: max allocated; CPU: the process's peak resident set, data included)."""
    out: dict[str, Any] = {"params": count_parameters(model)}
    device = next(model.parameters()).device
    prompts = [Prompt(rec.conversations[:1], path) for rec, path in items[: max(1, cfg.latency_samples)]]
    n_new = FIXED_NEW_TOKENS
    inputs = model_inputs(model, tok, transform, n_img, prompts[:1])
    with FlopCounterMode(display=False) as counter:
        greedy(model, tok, inputs, n_new, n_new)
    out["flops_per_sample"] = int(counter.get_total_flops())
    out["new_tokens"] = n_new
    out["prompt_tokens"] = inputs["input_ids"].shape[1]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = 0.0
    for prompt in prompts:
        t0 = time.perf_counter()
        generate(model, tok, transform, n_img, [prompt], batch_size=1, max_new_tokens=n_new,
                 min_new_tokens=n_new)  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
    out["latency_s"] = seconds / len(prompts)
    out["tokens_per_s"] = n_new * len(prompts) / seconds if seconds > 0 else None
    if device.type == "cuda":
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    out["weights_mb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    out["device"] = device.type
    return out


def _set_summary(s: EvalSet) -> dict[str, Any]:
    out: dict[str, Any] = {"source": s.source, "n": len(s.items), "skipped": len(s.skipped)}
    if s.note:
        out["note"] = s.note
    return out


def _evaluate_sets(model, tok, transform, n_img: int, sets: Sets, cfg: EvalConfig, plots: Path,
                   name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:  # fmt: skip
    """Every task's section (:func:`~geodistill.eval.tasks.combine` of its sets) and the predictions."""
    metrics: dict[str, Any] = {}
    predictions = []
    for task in EVAL_TASKS:
        per_set = {}
        for s in sets[task]:
            if not s.items:
                continue
            answers = _answer(model, tok, transform, n_img, s.items, cfg)
            records = [r for r, _ in s.items]
            per_set[s.name] = score(task, answers, records, plots, name, s.name)
            for (rec, path), answer in zip(s.items, answers, strict=True):
                predictions.append(
                    {"task": task, "set": s.name, "id": rec.id, "image": str(path),
                     "question": rec.first_question, "prediction": answer, "reference": rec.answers[0],
                     "meta": dict(rec.meta)}
                )  # fmt: skip
        if per_set:
            metrics[task] = combine(task, per_set)
    return metrics, predictions


def evaluate_model(
    model_dir: Path,
    name: str,
    cfg: EvalConfig,
    prepared: Path,
    image_root: Path,
    plots: Path,
    on_error: loaders.OnError = "raise",
) -> dict:
    """Run every set of every task on one model; write predictions, the confusion matrices and the skips
    under ``plots``.

    ``on_error``: a bad evaluation item (unreadable image, a path out of its folder, a malformed
    benchmark record) raises a DataError naming it, or with "skip" is left out and counted.
    """
    sets = load_sets(cfg, prepared, image_root, on_error)
    model, tok, transform = load_for_inference(model_dir)
    n_img = num_image_tokens(model.config)
    plots.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {"model": name, "split": cfg.split}
    metrics["sets"] = {t: {s.name: _set_summary(s) for s in ss} for t, ss in sets.items()}
    skipped = {t: {s.name: s.skipped for s in ss} for t, ss in sets.items()}
    (plots / "skipped.json").write_text(json.dumps(skipped, indent=2) + "\n")
    t0 = time.perf_counter()
    task_metrics, predictions = _evaluate_sets(model, tok, transform, n_img, sets, cfg, plots, name)
    metrics.update(task_metrics)
    metrics["eval_seconds"] = time.perf_counter() - t0
    first = next((s.items for ss in sets.values() for s in ss if s.items), [])
    if first:
        metrics["efficiency"] = efficiency(model, tok, transform, n_img, first, cfg)
    with (plots / "predictions.jsonl").open("w") as f:
        for p in predictions:
            f.write(json.dumps(p) + "\n")
    return metrics


def input_notes(metrics: dict) -> list[str]:
    """What a reader of the numbers must know about the inputs: empty sets (and the param that fills
    them) and skipped items."""
    lines = []
    for task, by_name in (metrics.get("sets") or {}).items():
        for name, s in by_name.items():
            if s.get("note"):
                lines.append(f"no evaluation set: {s['note']}")
            if s.get("skipped"):
                lines.append(
                    f"{task}/{name}: {s['skipped']} bad item(s) of {s['source']} skipped (see skipped.json)"
                )
    return lines


def scalars(d: Any) -> Any:
    """Only the numbers (and nesting) of a metrics dict: what `dvc metrics show/diff` can compare."""
    if isinstance(d, dict):
        out = {k: scalars(v) for k, v in d.items() if not isinstance(v, list | tuple)}
        return {k: v for k, v in out.items() if v is not None and v != {}}
    return d if isinstance(d, int | float) and not isinstance(d, bool) else None
