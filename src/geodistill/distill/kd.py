"""Distillation from the teacher cache: the step that combines the paper's terms.

    L = kl_weight * KL_kind(q || p) on cached top-k      (eq. 6-7, single-step, ground-truth prefixes)
      + align_weight * L_align(projector features)       (eq. 4)
      + pt_weight * L_PT(pretraining corpus)             (eq. 10)
      + sft_weight * CE(ground truth)                    (not in the paper; 1 by default: the val sweep)
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
from geodistill.config import CacheConfig, DistillConfig, Precision, StudentConfig
from geodistill.data.collate import IGNORE, Batch, Example, collate_text, left_pad
from geodistill.data.prepare import read_pretrain
from geodistill.data.shards import load_manifest
from geodistill.data.template import encode_conversation
from geodistill.distill.losses import distill_kl, feature_align_loss, lm_loss, make_adapter
from geodistill.distill.onpolicy import mixed_sample, onpolicy_losses
from geodistill.distill.sft import Collator, RunPaths, finish_run, prepare_trainable, run_key, train_batches
from geodistill.distill.train import RunLog, run_loop
from geodistill.distributed import Dist
from geodistill.errors import CacheError, ConfigError, ModelError
from geodistill.models.checkpoints import (
    load_for_inference,
    load_for_training,
    model_fingerprint,
    precision_dtype,
)
from geodistill.models.llava import capture_projector, device_of, num_image_tokens, unwrap
from geodistill.models.tokenizer import check_compatible, tokenizer_hash
from geodistill.models.transform import ImageTransform


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
    kl_mask = batch.labels[:, 1:] != IGNORE  # (B, T-1): position t predicts token t+1
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
    feats = torch.from_numpy(reader.features([ex.sample_key for ex in examples]))  # decoded float32
    dev = kl_mask.device  # the batch's, so the student's
    ids_t, lps_t = torch.cat(ids).long().to(dev), torch.cat(lps).float().to(dev)
    return CachedTargets(ids_t, lps_t, kl_mask, feats.to(dev))


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
    return ids, (labels != IGNORE).long(), labels


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
    ids, mask = (t.to(pixel_values.device) for t in left_pad(prompts, tok.pad_token_id))
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


def pretrain_texts(prepared: Path, cfg: DistillConfig) -> list[str]:
    """The L_PT corpus ``prepared/pretrain.jsonl`` ([] when ``pt_weight`` is 0, without reading it).

    An empty corpus with ``pt_weight > 0`` is an error, not a warning: the run would record an objective
    (params.yaml) that it never trained, and experiments compared on it would differ in name only.
    """
    if cfg.pt_weight <= 0:
        return []
    texts = read_pretrain(prepared)
    if not texts:
        raise ConfigError(
            f"distill.pt_weight is {cfg.pt_weight} but the L_PT corpus {prepared / 'pretrain.jsonl'} is "
            "empty: set distill.pt_weight: 0, or give a pretraining corpus (data.geochat.pretrain_jsonl)"
        )
    return texts


def load_teacher(teacher_dir: Path, tok, transform: ImageTransform, precision: Precision) -> nn.Module:
    """The frozen live teacher for the on-policy terms, on this process's device (where ``run_loop`` puts
    the student) in the training ``precision``'s dtype (a bf16 run keeps a 13B teacher in 26 GB, not 52);
    it must tokenise and preprocess as the student."""
    device = Dist.from_env().device
    dtype = precision_dtype(precision, device, "distill.train.precision")
    teacher, teacher_tok, teacher_transform = load_for_inference(teacher_dir, device=device, dtype=dtype)
    check_compatible(teacher_tok, tok)
    if teacher_transform != transform:
        raise ModelError(
            f"teacher and student preprocess images differently ({teacher_transform} vs {transform})"
        )
    return teacher


@dataclass
class DistillStep:
    """``run_loop``'s step for distillation: the cached terms every step, the on-policy ones every N."""

    kd: KDModule
    reader: CacheReader
    collator: Collator
    cfg: DistillConfig
    pooling: int
    pt_texts: list[str]
    teacher: nn.Module | None
    generator: torch.Generator
    rank: int

    def __call__(self, examples: list[Example], step: int) -> dict[str, torch.Tensor]:
        cfg, tok = self.cfg, self.collator.tok
        device = device_of(self.kd)  # where run_loop placed the student
        batch = self.collator(examples).to(device)
        targets = gather_targets(self.reader, examples, batch)
        # Seeded by step, not one running RNG: a resumed run draws the same L_PT batches.
        rng = random.Random(f"pt-{cfg.train.seed}-{self.rank}-{step}")
        pt = None
        if self.pt_texts:
            pt = pretrain_batch(self.pt_texts, rng, cfg.pt_batch_size, tok, cfg.train.max_len)
            pt = tuple(t.to(device) for t in pt)
        terms = offline_terms(self.kd, batch, targets, cfg, self.pooling, pt)
        if self.teacher is not None and step % cfg.onpolicy.every == 0:
            sub = examples[: cfg.onpolicy.batch_size]
            pixels = batch.pixel_values[: len(sub)]
            extra = onpolicy_terms(
                self.kd, self.teacher, sub, pixels, cfg, tok, self.collator.n_img, self.generator
            )
            terms.update(extra)
            terms["loss"] = terms["loss"] + extra["onpolicy_total"]
        return terms


def run_distill(
    cfg: DistillConfig,
    cache_cfg: CacheConfig,
    student_cfg: StudentConfig,
    *,
    shards: Path,
    cache_path: Path,
    base_dir: Path,
    teacher_dir: Path,
    prepared: Path,
    paths: RunPaths,
) -> dict[str, Any]:
    """Distil the baseline in ``base_dir`` into ``paths.out`` from the cache (+ the live teacher if
    on-policy); ``prepared`` holds the L_PT corpus (``pretrain.jsonl``).

    Resumable from ``paths.checkpoints``; ends with ``finish_run`` (the feature adapter is dropped: it is
    not part of the student).
    """
    pt_texts = pretrain_texts(prepared, cfg)  # first: an unusable corpus fails before anything loads
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
    # the on-policy terms are the only reason to load the teacher model at all
    teacher = load_teacher(teacher_dir, tok, transform, train.precision) if cfg.onpolicy.enabled else None
    collator = Collator(tok, transform, n_img, train.max_len)
    d = Dist.from_env()
    generator = torch.Generator().manual_seed(train.seed + 1000 * d.rank)
    step = DistillStep(kd, reader, collator, cfg, cache_cfg.pooling, pt_texts, teacher, generator, d.rank)
    key = run_key("student_kd", cfg, cache_cfg, student_cfg, expected, model_fingerprint(base_dir))
    log = RunLog(paths.log_dir)
    result = run_loop(
        kd,
        train_batches(shards, train, d),
        step,
        train,
        paths.checkpoints,
        logger=log,
        generator=generator,
        deepspeed=cfg.deepspeed,
        run_key=key,
    )
    return finish_run(kd.student, collator, train, result, log, shards / "val", paths)
