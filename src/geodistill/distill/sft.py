"""Supervised fine-tuning on ground truth: the teacher (embedded default), the baseline student and
the equal-compute control all train through this, on the shared loop in ``train.py``.

Also what every training stage (distillation too) shares around that loop: the paths a stage passes,
the run key, the collator, the held-out loss and ``finish_run``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from geodistill.config import StudentConfig, TrainConfig
from geodistill.data.collate import IGNORE, Batch, Example, collate, iter_examples, shuffled_batches
from geodistill.distill.losses import lm_loss
from geodistill.distill.train import LoopResult, RunLog, clear_checkpoint, run_loop
from geodistill.distributed import Dist
from geodistill.models.checkpoints import load_for_training, save_llava, write_fingerprint
from geodistill.models.llava import (
    apply_lora,
    build_llava,
    device_of,
    freeze_vision_tower,
    merge_lora,
    num_image_tokens,
    unwrap,
)
from geodistill.models.tokenizer import check_compatible
from geodistill.models.transform import ImageTransform


@dataclass(frozen=True)
class RunPaths:
    """Where one training run writes; the stage chooses every path."""

    out: Path
    """The trained model (a DVC output), with ``fingerprint.json`` and ``train_summary.json``."""
    log_dir: Path
    """dvclive metrics and plots (the pipeline's: ``dvclive/<model name>``)."""
    checkpoints: Path
    """Resumable state. Not a DVC output: DVC deletes those before it re-runs a stage."""


def run_key(*parts: Any) -> str:
    """A stable hash of everything that defines a run (configs, input hashes)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()[:16]


class Collator:
    """Examples -> Batch for one model's tokenizer and image transform."""

    def __init__(self, tok, transform: ImageTransform, num_image_tokens: int, max_len: int) -> None:
        self.tok, self.transform, self.n_img, self.max_len = tok, transform, num_image_tokens, max_len

    def __call__(self, examples: list[Example]) -> Batch:
        return collate(examples, self.tok, self.transform, self.n_img, self.max_len, self.tok.pad_token_id)


def forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    """(B, T, V) logits of a LLaVA model on a batch (on the model's device)."""
    return model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values
    ).logits


def sft_step(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """Cross-entropy on assistant tokens only."""
    batch = batch.to(device_of(model))
    loss = lm_loss(forward(model, batch), batch.labels)
    return {"loss": loss, "ce": loss.detach()}


@torch.no_grad()
def heldout_loss(model: nn.Module, batches: Iterator[Batch], max_batches: int) -> dict[str, float]:
    """Teacher-forced CE and next-token accuracy on assistant tokens (a cheap held-out signal)."""
    was_training = model.training
    model.eval()
    total_ce, total_ok, total_n = 0.0, 0, 0
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        batch = batch.to(device_of(model))
        logits = forward(model, batch)[:, :-1]
        labels = batch.labels[:, 1:]
        m = labels != IGNORE
        ce = torch.nn.functional.cross_entropy(logits[m], labels[m], reduction="sum")
        total_ce += float(ce)
        total_ok += int((logits[m].argmax(-1) == labels[m]).sum())
        total_n += int(m.sum())
    model.train(was_training)
    return {"loss": total_ce / max(1, total_n), "token_acc": total_ok / max(1, total_n), "tokens": total_n}


def train_batches(shards: Path, cfg: TrainConfig, d: Dist) -> Iterator[list[Example]]:
    """This rank's endless batch stream of ``shards/train`` for a loop's settings. The equal-compute control
    and distillation both take theirs from here with ``distill.train``, so they see one batch order."""
    return shuffled_batches(
        shards / "train",
        cfg.batch_size,
        cfg.seed,
        rank=d.rank,
        world_size=d.world_size,
        length_group=cfg.length_group,
    )


def val_batches(shard_dir: Path, collator: Collator, batch_size: int) -> Iterator[Batch]:
    """One deterministic pass over a (validation) shard folder."""
    chunk: list[Example] = []
    for ex in iter_examples(shard_dir):
        chunk.append(ex)
        if len(chunk) == batch_size:
            yield collator(chunk)
            chunk = []
    if chunk:
        yield collator(chunk)


def make_student(cfg: StudentConfig, tok) -> tuple[nn.Module, ImageTransform]:
    """The initial student: built from ``cfg.arch`` with ``cfg.init_seed``, or loaded from a checkpoint."""
    if cfg.source == "build":
        model = build_llava(cfg.arch, tok, cfg.init_seed)
        transform = ImageTransform(cfg.arch.image_size)
    else:
        model, student_tok, transform = load_for_training(cfg.path)
        check_compatible(tok, student_tok)
    return model, transform


def prepare_trainable(model: nn.Module, cfg: StudentConfig) -> nn.Module:
    """Apply the student's freezing and LoRA settings (returns the possibly peft-wrapped model)."""
    if cfg.freeze_vision:
        freeze_vision_tower(model)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets)
    return model


def finish_run(
    model: nn.Module,
    collator: Collator,
    cfg: TrainConfig,
    result: LoopResult,
    log: RunLog,
    val_dir: Path,
    paths: RunPaths,
) -> dict[str, Any]:
    """The end of every training stage, once ``run_loop`` returned ``result`` for ``model``.

    Merges LoRA, measures the held-out loss on ``val_dir``, closes the log, saves the model with its
    fingerprint and ``train_summary.json`` (rank 0), clears the resumable checkpoint, prints one line
    and returns the summary. Steps run by this process and steps resumed from a checkpoint are counted
    apart; ``seconds`` is this process's training time.
    """
    model = merge_lora(model)
    val = heldout_loss(model, val_batches(val_dir, collator, cfg.batch_size), max_batches=40)
    log.end({f"val_{k}": v for k, v in val.items()})
    summary = {
        "steps": result.steps,
        "steps_run": result.steps - result.resumed_from,
        "resumed_from": result.resumed_from,
        "seconds": round(result.seconds, 1),
        "skipped_nonfinite": result.skipped_nonfinite,
        "train": result.last,
        "val": val,
    }
    if Dist.from_env().is_main:
        save_llava(model, collator.tok, collator.transform, paths.out)
        write_fingerprint(paths.out)
        (paths.out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    clear_checkpoint(paths.checkpoints)
    resumed = f" (resumed from step {result.resumed_from} of {result.steps})" if result.resumed_from else ""
    print(
        f"{paths.out.name}: {summary['steps_run']} steps in {result.seconds:.0f} s{resumed}; "
        f"val loss {val['loss']:.4f}, token acc {val['token_acc']:.4f}"
    )
    return summary


def sft_stage(
    model: nn.Module,
    tok,
    transform: ImageTransform,
    cfg: TrainConfig,
    shards: Path,
    paths: RunPaths,
    *,
    key: str,
) -> dict[str, Any]:
    """Train by SFT on ``shards/train``, then ``finish_run``; resumable from ``paths.checkpoints``."""
    d = Dist.from_env()
    collator = Collator(tok, transform, num_image_tokens(unwrap(model).config), cfg.max_len)
    torch.manual_seed(cfg.seed)
    log = RunLog(paths.log_dir)
    result = run_loop(
        model,
        train_batches(shards, cfg, d),
        lambda examples, _step: sft_step(model, collator(examples)),
        cfg,
        paths.checkpoints,
        logger=log,
        run_key=key,
    )
    return finish_run(model, collator, cfg, result, log, shards / "val", paths)
