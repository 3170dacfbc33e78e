"""Distillation from the teacher cache: the step that combines the paper's terms.

    L = kl_weight * KL_kind(q || p) on cached top-k      (eq. 6-7, single-step, ground-truth prefixes)
      + align_weight * L_align(projector features)       (eq. 4)
      + pt_weight * L_PT(pretraining corpus)             (eq. 10)
      + sft_weight * CE(ground truth)                    (optional; 0 in the paper's recipe)
      + every N steps: MiniLLM's on-policy terms on student samples, scored by the live teacher (eq. 8-9)

Only the on-policy terms need the teacher model; everything else reads the cache.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from geodistill.cache.fingerprint import cache_fingerprint
from geodistill.cache.store import CacheReader, record_key
from geodistill.config import CacheConfig, DistillConfig, StudentConfig
from geodistill.data.collate import Batch, Example, collate_text, shuffled_batches
from geodistill.data.prepare import read_pretrain
from geodistill.data.shards import load_manifest
from geodistill.data.template import encode_conversation
from geodistill.distill.losses import distill_kl, feature_align_loss, lm_loss, make_adapter
from geodistill.distill.onpolicy import mixed_sample, onpolicy_losses
from geodistill.distill.sft import Collator, heldout_loss, prepare_trainable, run_key, val_batches
from geodistill.distill.train import clear_checkpoint, dvclive_logger, run_loop
from geodistill.distributed import Dist
from geodistill.errors import CacheError, ModelError
from geodistill.eval.generate import left_pad
from geodistill.models.checkpoints import (
    load_for_training,
    model_fingerprint,
    save_llava,
    write_fingerprint,
)
from geodistill.models.llava import capture_projector, merge_lora, num_image_tokens, unwrap
from geodistill.models.tokenizer import check_compatible, tokenizer_hash


class KDModule(nn.Module):
    """Everything distillation trains: the student and (when widths differ) the feature adapter.

    One module so the optimizer, DDP averaging, DeepSpeed and checkpoints see one set of parameters.
    """

    def __init__(self, student: nn.Module, adapter: nn.Module | None) -> None:
        super().__init__()
        self.student = student
        self.adapter = adapter


@dataclass(frozen=True)
class CachedTargets:
    topk_ids: torch.Tensor  # (M, k) long, M = supervised tokens of the batch (row-major)
    topk_logprobs: torch.Tensor  # (M, k) float32
    kl_mask: torch.Tensor  # (B, T-1) bool: the student positions the M rows belong to
    features: torch.Tensor  # (B, P', D_t) float32


def gather_targets(reader: CacheReader, examples: Sequence[Example], batch: Batch) -> CachedTargets:
    """Align the cached teacher rows with the student's supervised positions of ``batch``.

    The student may truncate a record (max_len) and so see fewer assistant tokens than were cached:
    it then uses the first n cached rows. It can never see more with the same tokenizer and template
    (both in the cache fingerprint); if it does, the cache is stale.
    """
    kl_mask = batch.labels[:, 1:] != -100  # (B, T-1): position t predicts token t+1
    rows = reader.tokens([record_key(ex.sample_key, ex.index) for ex in examples])
    ids, lps = [], []
    for b, (row, ex) in enumerate(zip(rows, examples, strict=True)):
        n = int(kl_mask[b].sum())
        if n > len(row.ids):
            raise CacheError(
                f"record {ex.record.id!r}: the student supervises {n} tokens but the cache holds "
                f"{len(row.ids)}; the cache is stale: `dvc repro teacher_cache`"
            )
        ids.append(torch.from_numpy(row.ids[:n]))
        lps.append(torch.from_numpy(row.logprobs[:n]))
    feats = torch.from_numpy(reader.features([ex.sample_key for ex in examples]).astype("float32"))
    return CachedTargets(torch.cat(ids).long(), torch.cat(lps).float(), kl_mask, feats)


def offline_terms(
    kd: KDModule,
    batch: Batch,
    targets: CachedTargets,
    cfg: DistillConfig,
    pool: int,
    pt: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """Every term computed from the cache (and the pretraining batch ``pt`` = ids, mask, labels)."""
    with capture_projector(kd.student) as cap:
        logits = kd.student(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values
        ).logits  # (B, T, V)
    kl = distill_kl(
        cfg.kl,
        logits[:, :-1],
        targets.topk_ids,
        targets.topk_logprobs,
        targets.kl_mask,
        beta=cfg.jsd_beta,
        alpha=cfg.skew_alpha,
    )
    ce = lm_loss(logits, batch.labels)
    terms = {"kl": kl, "ce": ce.detach()}
    total = cfg.kl_weight * kl + (cfg.sft_weight * ce if cfg.sft_weight > 0 else 0.0)
    if cfg.align_weight > 0:
        terms["align"] = feature_align_loss(cap.features, targets.features, kd.adapter, pool=pool)
        total = total + cfg.align_weight * terms["align"]
    if pt is not None and cfg.pt_weight > 0:
        ids, mask, labels = pt
        terms["pt"] = lm_loss(kd.student(input_ids=ids, attention_mask=mask).logits, labels)
        total = total + cfg.pt_weight * terms["pt"]
    terms["loss"] = total
    return terms


def pretrain_batch(texts: Sequence[str], rng: random.Random, n: int, tok, max_len: int):
    """A random L_PT batch: (ids, attention mask, labels)."""
    chosen = [texts[rng.randrange(len(texts))] for _ in range(n)]
    ids, labels = collate_text(chosen, tok, max_len, tok.pad_token_id)
    return ids, (labels != -100).long(), labels


def onpolicy_terms(
    kd: KDModule,
    teacher: nn.Module,
    examples: Sequence[Example],
    pixel_values: torch.Tensor,
    cfg: DistillConfig,
    tok,
    num_image_tokens: int,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """MiniLLM's on-policy terms on responses sampled from (1-a) q + a p for the examples' prompts."""
    o = cfg.onpolicy
    # The first question of each record is the prompt; the student answers it itself.
    prompts = [
        encode_conversation(tok, ex.record.conversations[:2], num_image_tokens, for_generation=True).input_ids
        for ex in examples
    ]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    samples = mixed_sample(
        kd.student,
        teacher,
        ids,
        mask,
        pixel_values,
        max_new_tokens=o.max_new_tokens,
        mix_alpha=o.mix_alpha,
        temperature=o.temperature,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        generator=generator,
    )
    out = onpolicy_losses(
        kd.student, teacher, samples, clip=o.clip, single_weight=o.single_weight, long_weight=o.long_weight
    )
    return {f"onpolicy_{k}": v for k, v in out.items()}


def run_distill(
    cfg: DistillConfig,
    cache_cfg: CacheConfig,
    student_cfg: StudentConfig,
    *,
    shards: Path,
    cache_path: Path,
    base_dir: Path,
    teacher_dir: Path,
    out: Path,
    name: str = "distill",
) -> dict[str, Any]:
    """Distil the baseline in ``base_dir`` into ``out`` from the cache (+ the live teacher if on-policy)."""
    train = cfg.train
    torch.manual_seed(train.seed)  # before the feature adapter and LoRA are initialised: same run, same init
    student, tok, transform = load_for_training(base_dir)
    manifest = load_manifest(shards / "train")
    expected = cache_fingerprint(teacher_dir, manifest, cache_cfg, len(tok))
    if tokenizer_hash(tok) != expected["tokenizer_sha256"]:
        raise ModelError(
            f"the student in {base_dir} and the teacher in {teacher_dir} use different tokenizers; "
            "distillation from token-level top-k needs one shared tokenizer"
        )
    reader = CacheReader(cache_path, expected, manifest, max_shards=None)
    n_img = num_image_tokens(unwrap(student).config)
    d_teacher = int(reader.features([next(iter(reader.image_index()))]).shape[-1])
    adapter = make_adapter(unwrap(student).config.text_config.hidden_size, d_teacher)
    student = prepare_trainable(student, student_cfg)
    kd = KDModule(student, adapter)

    teacher = None
    if cfg.onpolicy.enabled:  # the only reason to load the teacher model at all
        teacher, teacher_tok, teacher_transform = load_for_training(teacher_dir)
        check_compatible(teacher_tok, tok)
        if teacher_transform != transform:
            raise ModelError(
                f"teacher and student preprocess images differently ({teacher_transform} vs {transform})"
            )
        teacher.eval().requires_grad_(False)

    collator = Collator(tok, transform, n_img, train.max_len)
    pt_texts = read_pretrain(Path("data/prepared")) if cfg.pt_weight > 0 else []
    d = Dist.from_env()
    generator = torch.Generator().manual_seed(train.seed + 1000 * d.rank)

    def step_fn(examples: list[Example], step: int) -> dict[str, torch.Tensor]:
        batch = collator(examples)
        targets = gather_targets(reader, examples, batch)
        # Seeded by step, not one running RNG: a resumed run draws the same L_PT batches.
        rng = random.Random(f"pt-{train.seed}-{d.rank}-{step}")
        pt = pretrain_batch(pt_texts, rng, cfg.pt_batch_size, tok, train.max_len) if pt_texts else None
        terms = offline_terms(kd, batch, targets, cfg, cache_cfg.pooling, pt)
        if teacher is not None and step % cfg.onpolicy.every == 0:
            sub = examples[: cfg.onpolicy.batch_size]
            extra = onpolicy_terms(
                kd, teacher, sub, batch.pixel_values[: len(sub)], cfg, tok, n_img, generator
            )
            terms.update(extra)
            terms["loss"] = terms["loss"] + extra["onpolicy_total"]
        return terms

    log, live = dvclive_logger(Path("dvclive") / name)
    batches = shuffled_batches(
        shards / "train", train.batch_size, train.seed, rank=d.rank, world_size=d.world_size
    )
    key = run_key(name, cfg, cache_cfg, student_cfg, expected, model_fingerprint(base_dir))
    ckpt = Path("checkpoints") / name
    result = run_loop(
        kd,
        batches,
        step_fn,
        train,
        ckpt,
        logger=log,
        generator=generator,
        deepspeed_stage=cfg.deepspeed.zero_stage if cfg.deepspeed.enabled else None,
        run_key=key,
    )
    final = merge_lora(kd.student)  # the adapter is dropped: it is not part of the student
    val = heldout_loss(final, val_batches(shards / "val", collator, train.batch_size), max_batches=40)
    for k, v in val.items():
        live.summary[f"val_{k}"] = v
    live.end()
    if d.is_main:
        save_llava(final, tok, transform, out)
        write_fingerprint(out)
    clear_checkpoint(ckpt)
    summary = {"steps": result.steps, "seconds": round(result.seconds, 1),
               "skipped_nonfinite": result.skipped_nonfinite, "train": result.last, "val": val}  # fmt: skip
    print(f"{name}: {result.steps} steps in {result.seconds:.0f} s; val loss {val['loss']:.4f}, "
          f"token acc {val['token_acc']:.4f}")  # fmt: skip
    return summary
