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
from geodistill.models.checkpoints import load
from geodistill.models.factory import count_parameters, num_image_tokens

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
    prompts = [Prompt(rec.conversations[:1], Image.open(path).convert("RGB")) for rec, path in items]
    bar = tqdm(total=len(prompts), unit="q", leave=False)
    answers, _ = generate(
        model, tok, transform, n_img, prompts, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
        progress=bar.update,
    )  # fmt: skip
    bar.close()
    return answers


@torch.inference_mode()
def efficiency(
    model, tok, transform, n_img: int, items: Sequence[tuple[Record, Path]], cfg: EvalConfig
) -> dict:
    """Parameters, FLOPs per sample (prefill + decode, torch.utils.flop_counter), batch-1 latency,
    generated tokens/s and the process's peak memory (Table 8)."""
    out: dict[str, Any] = {"params": count_parameters(model)}
    sample = list(items[: max(1, cfg.latency_samples)])
    rec, path = sample[0]
    image = Image.open(path).convert("RGB")
    ids = encode_conversation(tok, rec.conversations[:1], n_img, for_generation=True).input_ids
    input_ids, mask = left_pad([ids], tok.pad_token_id)
    pixels = transform(image).unsqueeze(0)
    with FlopCounterMode(display=False) as counter:
        gen = model.generate(input_ids=input_ids, attention_mask=mask, pixel_values=pixels, do_sample=False,
                             max_new_tokens=cfg.max_new_tokens, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)  # fmt: skip
    out["flops_per_sample"] = int(counter.get_total_flops())
    out["flops_sample_new_tokens"] = int(gen.shape[1] - input_ids.shape[1])
    seconds, new_tokens = 0.0, 0
    for rec, path in sample:
        prompt = Prompt(rec.conversations[:1], Image.open(path).convert("RGB"))
        t0 = time.perf_counter()
        (answer,), _ = generate(
            model, tok, transform, n_img, [prompt], batch_size=1, max_new_tokens=cfg.max_new_tokens
        )
        seconds += time.perf_counter() - t0
        new_tokens += len(tok.encode(answer, add_special_tokens=False)) + 1
    out["latency_s"] = seconds / len(sample)
    out["tokens_per_s"] = new_tokens / seconds if seconds > 0 else None
    out["peak_memory_mb"] = (
        torch.cuda.max_memory_allocated() / 2**20
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    out["weights_mb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    out["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return out


def evaluate_model(
    model_dir: Path, name: str, cfg: EvalConfig, prepared: Path, image_root: Path, plots: Path
) -> dict:
    """Run every task on one model; write predictions and the confusion matrix under ``plots``."""
    model, tok, transform = load(model_dir, dtype=torch.float32)
    model.eval()
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
