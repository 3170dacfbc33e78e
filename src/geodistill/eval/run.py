"""Evaluate one model on the paper's four tasks plus efficiency (Tables 3-8).

Items come from the prepared split (``test.jsonl`` or ``val_eval.jsonl``) or, per task, from a real
benchmark configured in ``eval.benchmarks``. Every image is checked when its set is loaded (inside its
folder, decoded whole); a bad item raises a DataError naming it, or with ``on_error="skip"`` is left out,
counted in ``sets`` and listed in ``<plots>/skipped.json``. Every question is answered by batched
greedy decoding; unparseable answers count as wrong and are counted, never raised.

Output (``metrics/<model>.json``; sections named by task, :mod:`geodistill.eval.tasks`)::

    {"model", "split", "sets": {task: {source, n, skipped, note}},
     "scene": {OA, AA, per_class, confusion, rows, cols, n, unparsed},
     "vqa": {accuracy: {qtype: acc}, n, mOA, OA}, "referring": {acc@0.5, acc@0.25, by_size, by_objects, ...},
     "region_caption": {rouge1, rougeL, meteor, n}, "efficiency": {params, flops_per_sample, latency_s, ...}}

plus ``<plots>/predictions.jsonl`` (task, id, image, question, prediction, reference, meta),
``<plots>/confusion.png`` and ``<plots>/skipped.json``.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
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
from geodistill.eval.tasks import EVAL_TASKS, no_set_reason
from geodistill.models.checkpoints import load_for_inference
from geodistill.models.llava import count_parameters, num_image_tokens

Item = tuple[Record, Path]
"""One question and the path of its image."""


@dataclass(frozen=True)
class EvalSet:
    """The items of one task and where they came from."""

    task: str
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


def _eval_set(task: str, source: str | Path, loaded: loaders.LoadResult, image_dir: Path) -> EvalSet:
    return EvalSet(task, str(source), [(r, image_dir / r.image) for r in loaded.records], loaded.skipped)


def _prepared_sets(
    split_file: Path, image_root: Path, tasks: Sequence[str], on_error: loaders.OnError
) -> dict[str, EvalSet]:
    """The records of ``tasks`` in the prepared split, checked as a benchmark's are."""
    checked = {t: loaders.CheckedRecords(split_file, image_root, "image", on_error) for t in tasks}
    for rec in read_jsonl_records(split_file):
        if rec.task in checked:
            try:
                checked[rec.task].add(rec.to_dict())
            except DataError as e:
                checked[rec.task].skip(e)
    return {t: _eval_set(t, split_file, c.result(), image_root) for t, c in checked.items()}


def _benchmark_sets(cfg: EvalConfig, on_error: loaders.OnError) -> dict[str, EvalSet]:
    """The real benchmarks configured in ``eval.benchmarks`` (each replaces its task's prepared items)."""
    b = cfg.benchmarks
    sets: dict[str, EvalSet] = {}
    if b.scene_dir:
        res = loaders.load_scene_folder(b.scene_dir, on_error=on_error)
        sets["scene"] = _eval_set("scene", b.scene_dir, res, Path(b.scene_dir))
    if b.rsvqa_dir:
        q, a, i = loaders.rsvqa_files(b.rsvqa_dir, b.rsvqa_prefix)
        image_dir = Path(b.rsvqa_image_dir or b.rsvqa_dir)
        res = loaders.load_rsvqa(q, a, i, image_dir, on_error=on_error)
        sets["vqa"] = _eval_set("vqa", q, res, image_dir)
    if b.referring_jsonl:
        res = loaders.load_geochat_referring(b.referring_jsonl, b.image_dir, on_error=on_error)
        sets["referring"] = _eval_set("referring", b.referring_jsonl, res, Path(b.image_dir))
    if b.region_caption_json:
        res = loaders.load_geochat_region_captions(b.region_caption_json, b.image_dir, on_error=on_error)
        sets["region_caption"] = _eval_set("region_caption", b.region_caption_json, res, Path(b.image_dir))
    return sets


def load_sets(
    cfg: EvalConfig, prepared: Path, image_root: Path, on_error: loaders.OnError = "raise"
) -> dict[str, EvalSet]:
    """The evaluation set of every task (real benchmarks override the prepared split), at most
    ``cfg.limit`` items each."""
    split_file = prepared / ("test.jsonl" if cfg.split == "test" else "val_eval.jsonl")
    real = _benchmark_sets(cfg, on_error)
    from_split = [t for t in EVAL_TASKS if t not in real]
    sets = {**_prepared_sets(split_file, image_root, from_split, on_error), **real}
    if cfg.limit:
        sets = {t: EvalSet(t, s.source, s.items[: cfg.limit], s.skipped) for t, s in sets.items()}
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


def score(task: str, answers: list[str], records: list[Record], plots: Path, name: str) -> dict:
    """One task's metrics from the model's answers (scene also draws ``plots/confusion.png``)."""
    if task == "scene":
        classes = list(records[0].meta["classes"])
        m = classification_metrics(answers, [r.meta["label"] for r in records], classes)
        title = f"{name}: scene classification"
        plot_confusion_matrix(m["confusion"], m["rows"], plots / "confusion.png", title=title)
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


def evaluate_model(
    model_dir: Path,
    name: str,
    cfg: EvalConfig,
    prepared: Path,
    image_root: Path,
    plots: Path,
    on_error: loaders.OnError = "raise",
) -> dict:
    """Run every task on one model; write predictions, the confusion matrix and the skips under ``plots``.

    ``on_error``: a bad evaluation item (unreadable image, a path out of its folder, a malformed
    benchmark record) raises a DataError naming it, or with "skip" is left out and counted.
    """
    sets = load_sets(cfg, prepared, image_root, on_error)
    model, tok, transform = load_for_inference(model_dir)
    n_img = num_image_tokens(model.config)
    plots.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {"model": name, "split": cfg.split}
    metrics["sets"] = {t: _set_summary(s) for t, s in sets.items()}
    (plots / "skipped.json").write_text(json.dumps({t: s.skipped for t, s in sets.items()}, indent=2) + "\n")
    predictions = []
    t0 = time.perf_counter()
    for task in EVAL_TASKS:
        items = sets[task].items
        if not items:
            continue
        answers = _answer(model, tok, transform, n_img, items, cfg)
        records = [r for r, _ in items]
        metrics[task] = score(task, answers, records, plots, name)
        for (rec, path), answer in zip(items, answers, strict=True):
            predictions.append(
                {"task": task, "id": rec.id, "image": str(path), "question": rec.first_question,
                 "prediction": answer, "reference": rec.answers[0], "meta": dict(rec.meta)}
            )  # fmt: skip
    metrics["eval_seconds"] = time.perf_counter() - t0
    first = next((s.items for s in sets.values() if s.items), [])
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
    for task, s in (metrics.get("sets") or {}).items():
        if s.get("note"):
            lines.append(f"no evaluation set: {s['note']}")
        if s.get("skipped"):
            lines.append(f"{task}: {s['skipped']} bad item(s) of {s['source']} skipped (see skipped.json)")
    return lines


def scalars(d: Any) -> Any:
    """Only the numbers (and nesting) of a metrics dict: what `dvc metrics show/diff` can compare."""
    if isinstance(d, dict):
        out = {k: scalars(v) for k, v in d.items() if not isinstance(v, list | tuple)}
        return {k: v for k, v in out.items() if v is not None and v != {}}
    return d if isinstance(d, int | float) and not isinstance(d, bool) else None
