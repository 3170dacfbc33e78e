"""Evaluate one model on the paper's four tasks plus efficiency (Tables 3-8).

Items come from the prepared split (``test.jsonl`` or ``val_eval.jsonl``) or, per task, from a real
benchmark configured in ``eval.benchmarks``. Every item's question is answered by batched greedy
decoding; unparseable answers count as wrong and are counted, never raised.

Output (``metrics/<model>.json``)::

    {"model", "split", "scene": {OA, AA, per_class, confusion, rows, cols, n, unparsed},
     "vqa": {accuracy: {qtype: acc}, n, mOA, OA}, "grounding": {acc@0.5, acc@0.25, by_size, by_objects, ...},
     "captioning": {rouge1, rougeL, meteor, n}, "efficiency": {params, flops_per_sample, latency_s, ...}}

plus ``<plots>/predictions.jsonl`` (task, id, image, question, prediction, reference, meta) and
``<plots>/confusion.png``.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from geodistill.config import EvalConfig
from geodistill.data.records import Record
from geodistill.data.shards import read_jsonl_records
from geodistill.data.template import encode_conversation
from geodistill.eval import loaders
from geodistill.eval.generate import Prompt, generate, left_pad
from geodistill.eval.metrics import (
    GroundingItem,
    caption_metrics,
    classification_metrics,
    grounding_metrics,
    plot_confusion_matrix,
    vqa_metrics,
)
from geodistill.models.checkpoints import load_for_inference
from geodistill.models.llava import count_parameters, num_image_tokens

EVAL_TASKS = ("scene", "vqa", "referring", "region_caption")


def load_items(cfg: EvalConfig, prepared: Path, image_root: Path) -> dict[str, list[tuple[Record, Path]]]:
    """Evaluation records per task with their image paths (real benchmarks override the split)."""
    split_file = prepared / ("test.jsonl" if cfg.split == "test" else "val_eval.jsonl")
    items: dict[str, list[tuple[Record, Path]]] = {t: [] for t in EVAL_TASKS}
    for rec in read_jsonl_records(split_file):
        if rec.task in items:
            items[rec.task].append((rec, image_root / rec.image))
    b = cfg.benchmarks
    real: dict[str, tuple[list[Record], Path]] = {}
    if b.scene_dir:
        real["scene"] = (loaders.load_scene_folder(b.scene_dir).records, Path(b.scene_dir))
    if b.rsvqa_dir:
        q, a, i = loaders.rsvqa_files(b.rsvqa_dir, b.rsvqa_prefix)
        image_dir = Path(b.rsvqa_image_dir or b.rsvqa_dir)
        real["vqa"] = (loaders.load_rsvqa(q, a, i, image_dir).records, image_dir)
    if b.referring_jsonl:
        real["referring"] = (
            loaders.load_geochat_referring(b.referring_jsonl, b.image_dir).records,
            Path(b.image_dir),
        )
    if b.region_caption_json:
        res = loaders.load_geochat_region_captions(b.region_caption_json, b.image_dir)
        real["region_caption"] = (res.records, Path(b.image_dir))
    for task, (records, root) in real.items():
        items[task] = [(r, root / r.image) for r in records]
    if cfg.limit:
        items = {t: v[: cfg.limit] for t, v in items.items()}
    return items


def _answer(
    model, tok, transform, n_img: int, items: Sequence[tuple[Record, Path]], cfg: EvalConfig
) -> list[str]:
    prompts = [Prompt(rec.conversations[:1], path) for rec, path in items]
    bar = tqdm(total=len(prompts), unit="q", leave=False)
    answers, _ = generate(
        model, tok, transform, n_img, prompts, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
        progress=bar.update,
    )  # fmt: skip
    bar.close()
    return answers


FIXED_NEW_TOKENS = 16
"""Decode length forced when measuring FLOPs, latency and tokens/s, so models compare at equal work."""


@torch.inference_mode()
def efficiency(
    model, tok, transform, n_img: int, items: Sequence[tuple[Record, Path]], cfg: EvalConfig
) -> dict:
    """Table 8: parameters, FLOPs per sample (prefill + FIXED_NEW_TOKENS decode steps, counted by
    torch.utils.flop_counter), batch-1 latency and tokens/s at that decode length, and peak memory
    (CUDA: max allocated; CPU: the process's peak resident set, data included)."""
    out: dict[str, Any] = {"params": count_parameters(model)}
    device = next(model.parameters()).device
    sample = list(items[: max(1, cfg.latency_samples)])
    n_new = FIXED_NEW_TOKENS
    rec, path = sample[0]
    ids = encode_conversation(tok, rec.conversations[:1], n_img, for_generation=True).input_ids
    input_ids, mask = left_pad([ids], tok.pad_token_id)
    pixels = transform(Image.open(path).convert("RGB")).unsqueeze(0)
    with FlopCounterMode(display=False) as counter:
        dtype = next(model.parameters()).dtype
        model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            pixel_values=pixels.to(device, dtype=dtype),
            do_sample=False,
            min_new_tokens=n_new,
            max_new_tokens=n_new,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    out["flops_per_sample"] = int(counter.get_total_flops())
    out["new_tokens"] = n_new
    out["prompt_tokens"] = len(ids)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = 0.0
    for rec, path in sample:
        prompt = Prompt(rec.conversations[:1], path)
        t0 = time.perf_counter()
        generate(
            model, tok, transform, n_img, [prompt], batch_size=1, max_new_tokens=n_new, min_new_tokens=n_new
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
    out["latency_s"] = seconds / len(sample)
    out["tokens_per_s"] = n_new * len(sample) / seconds if seconds > 0 else None
    if device.type == "cuda":
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    out["weights_mb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    out["device"] = device.type
    return out


def evaluate_model(
    model_dir: Path, name: str, cfg: EvalConfig, prepared: Path, image_root: Path, plots: Path
) -> dict:
    """Run every task on one model; write predictions and the confusion matrix under ``plots``."""
    model, tok, transform = load_for_inference(model_dir)
    n_img = num_image_tokens(model.config)
    items = load_items(cfg, prepared, image_root)
    plots.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {"model": name, "split": cfg.split}
    predictions = []
    t0 = time.perf_counter()
    for task in EVAL_TASKS:
        task_items = items[task]
        if not task_items:
            continue
        answers = _answer(model, tok, transform, n_img, task_items, cfg)
        records = [r for r, _ in task_items]
        refs = [r.answers[0] for r in records]
        if task == "scene":
            classes = list(records[0].meta["classes"])
            m = classification_metrics(answers, [r.meta["label"] for r in records], classes)
            plot_confusion_matrix(
                m["confusion"], m["rows"], plots / "confusion.png", title=f"{name}: scene classification"
            )
            metrics["scene"] = m
        elif task == "vqa":
            metrics["vqa"] = vqa_metrics(answers, refs, [r.meta["qtype"] for r in records])
        elif task == "referring":
            metrics["grounding"] = grounding_metrics(
                GroundingItem.from_meta(a, r.meta) for a, r in zip(answers, records, strict=True)
            )
        else:
            metrics["captioning"] = caption_metrics(
                answers, [list(r.meta.get("refs", [ref])) for r, ref in zip(records, refs, strict=True)]
            )
        for (rec, path), answer, ref in zip(task_items, answers, refs, strict=True):
            predictions.append(
                {"task": task, "id": rec.id, "image": str(path), "question": rec.first_question,
                 "prediction": answer, "reference": ref, "meta": dict(rec.meta)}
            )  # fmt: skip
    metrics["eval_seconds"] = time.perf_counter() - t0
    first = next((v for v in items.values() if v), [])
    if first:
        metrics["efficiency"] = efficiency(model, tok, transform, n_img, first, cfg)
    with (plots / "predictions.jsonl").open("w") as f:
        for p in predictions:
            f.write(json.dumps(p) + "\n")
    return metrics


def headline(metrics: dict) -> dict[str, float | None]:
    """The paper's headline numbers of one model, flat (for tables and `dvc metrics`)."""
    g = metrics.get
    return {
        "scene_OA": (g("scene") or {}).get("OA"),
        "scene_AA": (g("scene") or {}).get("AA"),
        "vqa_mOA": (g("vqa") or {}).get("mOA"),
        "grounding_acc@0.5": (g("grounding") or {}).get("acc@0.5"),
        "grounding_acc@0.25": (g("grounding") or {}).get("acc@0.25"),
        "caption_rouge1": (g("captioning") or {}).get("rouge1"),
        "caption_rougeL": (g("captioning") or {}).get("rougeL"),
        "caption_meteor": (g("captioning") or {}).get("meteor"),
    }


def scalars(d: Any) -> Any:
    """Only the numbers (and nesting) of a metrics dict: what `dvc metrics show/diff` can compare."""
    if isinstance(d, dict):
        out = {k: scalars(v) for k, v in d.items() if not isinstance(v, list | tuple)}
        return {k: v for k, v in out.items() if v is not None and v != {}}
    return d if isinstance(d, int | float) and not isinstance(d, bool) else None
