"""The teacher pass: one batched, teacher-forced forward over every record, stored in the Zarr cache.

Per assistant token: the teacher's top-k ids and log-probs normalised over the full vocabulary (so the
tail mass is exact) and the exact log-prob of the ground-truth token. Per image: the projector outputs
(optionally average-pooled). Keys: a record is ``<sample key>#<index in sample>`` and an image is its
sample key, both unique by construction (GeoChat's own ids repeat across an image's records).

Work is split by shard: rank r of W builds shards r, r+W, ... (``torchrun --nproc_per_node W``). Each
shard group is written by one process and marked complete last, so a killed run resumes by rebuilding
only incomplete groups. Records are batched within a shard in order, so the content is the same for
any number of ranks.

Writing must not slow the teacher down (``python -m geodistill.bench.cache`` measures it). On a GPU the
forward runs asynchronously, so reading + collating the next batch and encoding + writing the previous
one run in two background threads meanwhile. On CPU those threads compete with the forward for the
same cores and the GIL: on 2 shared cores the overlapped loop was no faster than the sequential one
(0.86-1.02 vs 0.92-1.04 of a bare forward over 4 bench runs, within the machine's noise), so there the
simpler sequential loop runs; its read + collate + write cost ~5 % of the embedded teacher's forward.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from geodistill.cache.fingerprint import cache_fingerprint
from geodistill.cache.prefix import plan_prefixes, prefix_passes
from geodistill.cache.store import CacheWriter, ShardWriter, record_key
from geodistill.config import CacheConfig
from geodistill.data.collate import IGNORE, Batch, Example, collate
from geodistill.data.shards import iter_shard, load_manifest, shards_for_rank
from geodistill.distributed import Dist
from geodistill.errors import CacheError
from geodistill.models.checkpoints import load_for_inference, precision_dtype
from geodistill.models.features import pool_image_features
from geodistill.models.llava import capture_projector, num_image_tokens, unwrap

# ------------------------------------------------------------------------------- teacher signals


@dataclass
class TeacherOutput:
    """One batch's teacher signals: the supervised rows of every record, concatenated in batch order."""

    counts: list[int]  # (B,) supervised tokens of each record
    topk_ids: np.ndarray  # (N, k) int64, N = sum(counts)
    topk_logprobs: np.ndarray  # (N, k) float32, descending, normalised over the full vocabulary
    target_logprob: np.ndarray  # (N,) float32, log-prob of the ground-truth token
    features: np.ndarray | None = None  # (B, P', D) float32 pooled projector outputs; None: no images

    def per_record(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(ids (n, k), log-probs (n, k), target (n,)) of each record, as views."""
        cuts = np.cumsum(self.counts)[:-1]
        return zip(
            np.split(self.topk_ids, cuts),
            np.split(self.topk_logprobs, cuts),
            np.split(self.target_logprob, cuts),
            strict=True,
        )


TOPK_CHUNK_ELEMENTS = 1 << 22
"""Logit elements (rows x V) normalised at a time: 16 MB in float32, so that the row max, the exp-sum
and the top-k read a block that is still in cache, and bf16 logits are never copied to float32 whole.
Measured on 2 loaded CPU cores, every position supervised, V = 32000: the extraction's share of
``bench.cache``'s profile (forward_topk - bare) fell from 7.4 s to 1.6 s on a 4 x 512 Llama."""


@torch.inference_mode()
def topk_signals(logits: torch.Tensor, labels: torch.Tensor, k: int) -> TeacherOutput:
    """Top-k at every supervised position of a teacher-forced pass.

    logits (B, T, V); labels (B, T) unshifted, IGNORE where nothing is predicted (position t of the
    logits predicts token t + 1). Rows come out row-major: each record's answer tokens in turn order.
    log p = z - logsumexp(z) in float32 on blocks of rows: top-k of the raw logits z is the top-k of
    log p (a shift per row), so the (N, V) log-probs are never materialised.
    """
    targets = labels[:, 1:]  # (B, T-1)
    sel = targets != IGNORE  # (B, T-1)
    # Only the supervised positions (a few % of a LLaVA sequence) are read.
    rows_b, rows_t = sel.nonzero(as_tuple=True)  # (N,), (N,) row-major
    tgt_ids = targets[rows_b, rows_t]  # (N,)
    step = max(1, TOPK_CHUNK_ELEMENTS // logits.shape[-1])
    top_lp, top_ids, tgt = [], [], []
    for i in range(0, max(1, len(rows_b)), step):  # once even with no rows: (0, k) outputs
        z = logits[rows_b[i : i + step], rows_t[i : i + step]].float()  # (n, V)
        lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (n, 1)
        values, ids = z.topk(k, dim=-1)  # (n, k), sorted descending
        top_lp.append(values - lse)
        top_ids.append(ids)
        tgt.append((z.gather(-1, tgt_ids[i : i + step, None]) - lse).squeeze(-1))  # (n,)
    return TeacherOutput(
        sel.sum(1).tolist(),
        torch.cat(top_ids).cpu().numpy(),
        torch.cat(top_lp).cpu().numpy(),
        torch.cat(tgt).float().cpu().numpy(),
    )


@torch.inference_mode()
def teacher_signals(
    model: torch.nn.Module, batch: Batch, k: int, pooling: int, *, prefix_reuse: bool = False
) -> TeacherOutput:
    """Teacher-forced forward of one collated LLaVA batch -> top-k signals and pooled projector features.

    With ``prefix_reuse`` the records of an image that share a prefix holding the image run it once
    (:mod:`geodistill.cache.prefix`, which states the rule); the rest, and every batch without such a
    group, take the plain pass. Same rows and features either way, up to float32 noise.
    """
    batch = batch.to(next(model.parameters()).device)
    plan = plan_prefixes(batch, unwrap(model).config.image_token_id) if prefix_reuse else None
    if plan is None or not plan.groups:
        return _plain_signals(model, batch, k, pooling)
    suffix = prefix_passes(model, batch, plan.groups)
    reused = topk_signals(suffix.logits, suffix.labels, k)
    reused.features = pool_image_features(suffix.features.float(), pooling)[suffix.group_of].cpu().numpy()
    parts = [(suffix.rows, reused)]
    if plan.plain:
        parts.append((plan.plain, _plain_signals(model, _select(batch, plan.plain), k, pooling)))
    return _in_batch_order(parts, len(batch.image_ids))


def _plain_signals(model: torch.nn.Module, batch: Batch, k: int, pooling: int) -> TeacherOutput:
    """Every record's whole sequence in one forward."""
    with capture_projector(model) as cap:
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values
        ).logits  # (B, T, V)
    out = topk_signals(logits, batch.labels, k)
    out.features = pool_image_features(cap.features.float(), pooling).cpu().numpy()  # (B, P', D)
    return out


def _select(batch: Batch, rows: list[int]) -> Batch:
    """Some rows of a right-padded batch, trimmed to their longest record."""
    idx = torch.tensor(rows, device=batch.input_ids.device)
    t = int(batch.attention_mask[idx].sum(1).max())
    return Batch(
        batch.input_ids[idx, :t],
        batch.attention_mask[idx, :t],
        batch.labels[idx, :t],
        batch.pixel_values[idx],
        [batch.record_ids[r] for r in rows],
        [batch.image_ids[r] for r in rows],
        0,
    )


def _in_batch_order(parts: list[tuple[list[int], TeacherOutput]], n: int) -> TeacherOutput:
    """One output from several passes over disjoint rows (``(batch rows, their output)``), rows 0..n-1."""
    slots: list[Any] = [None] * n
    for rows, out in parts:
        assert out.features is not None
        for r, record, feats in zip(rows, out.per_record(), out.features, strict=True):
            slots[r] = (record, feats)
    if any(s is None for s in slots):
        covered = sum(s is not None for s in slots)
        raise CacheError(f"teacher signals cover {covered} of {n} batch rows (a bug in the prefix plan)")
    ids, lps, tgt = zip(*(record for record, _ in slots), strict=True)
    return TeacherOutput(
        [len(t) for t in tgt],
        np.concatenate(ids),
        np.concatenate(lps),
        np.concatenate(tgt),
        np.stack([feats for _, feats in slots]),
    )


# ------------------------------------------------------------------------------------- one shard


@dataclass
class KeyedBatch:
    """A model batch with the cache keys of its records."""

    batch: Any
    """What the signals function takes (a collated :class:`Batch` for a LLaVA teacher)."""
    record_keys: list[str]
    image_keys: list[str] = field(default_factory=list)
    """The image of each record (an image's records repeat its key); ignored when there are no features."""


def shard_batches(
    path: Path, batch_size: int, collate_fn: Callable[[list[Example]], Any]
) -> Iterator[KeyedBatch]:
    """Collated batches of one shard's records, in order."""
    chunk: list[Example] = []
    for sample in iter_shard(path):
        for i, rec in enumerate(sample.records):
            chunk.append(Example(rec, sample.image_bytes, sample.key, i))
            if len(chunk) == batch_size:
                yield _keyed(chunk, collate_fn)
                chunk = []
    if chunk:
        yield _keyed(chunk, collate_fn)


def _keyed(chunk: list[Example], collate_fn: Callable[[list[Example]], Any]) -> KeyedBatch:
    keys = [record_key(ex.sample_key, ex.index) for ex in chunk]
    return KeyedBatch(collate_fn(chunk), keys, [ex.sample_key for ex in chunk])


def build_shard(
    signals: Callable[[Any], TeacherOutput],
    batches: Iterable[KeyedBatch],
    sw: ShardWriter,
    *,
    overlap: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
) -> int:
    """Run ``signals`` over one shard's batches and stream the results into ``sw``; returns tokens written.

    With ``overlap``, batch i + 1 is read and collated and batch i - 1 encoded and written in background
    threads while the teacher computes batch i. Writes stay in order with at most one in flight, so
    memory is bounded and the content is the same as without overlap. ``on_batch(records, tokens)`` is
    called after each batch is written. An error anywhere propagates (the shard is then left incomplete).
    """
    seen_images: set[str] = set()
    tokens = 0

    def write(kb: KeyedBatch, out: TeacherOutput) -> None:
        nonlocal tokens
        for key, (ids, lps, tgt) in zip(kb.record_keys, out.per_record(), strict=True):
            sw.add_record(key, ids, lps, tgt)
        if out.features is not None:
            for row, image in enumerate(kb.image_keys):
                # All records of an image share its features; store them once (the first record's).
                if image not in seen_images:
                    seen_images.add(image)
                    sw.add_image(image, out.features[row])
        tokens += len(out.target_logprob)
        if on_batch is not None:
            on_batch(len(kb.record_keys), len(out.target_logprob))

    if not overlap:
        for kb in batches:
            write(kb, signals(kb.batch))
        return tokens
    source = iter(batches)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="teacher-cache") as pool:
        upcoming = pool.submit(next, source, None)
        written: Future[None] | None = None
        while (kb := upcoming.result()) is not None:
            upcoming = pool.submit(next, source, None)  # read + collate the next batch meanwhile
            out = signals(kb.batch)
            if written is not None:
                written.result()  # one write in flight (re-raises its error here)
            written = pool.submit(write, kb, out)
        if written is not None:
            written.result()
    return tokens


# ------------------------------------------------------------------------------------ the stage


def build_cache(
    teacher_dir: Path, shard_dir: Path, out: Path, cfg: CacheConfig, *, progress: bool = True
) -> dict[str, Any]:
    """Build (or resume) the cache for this process's shards; returns counts and throughput."""
    dctx = Dist.from_env()
    dctx.init()
    device = dctx.device
    dtype = precision_dtype(cfg.precision, device, "cache.precision")
    model, tok, transform = load_for_inference(teacher_dir, device=device, dtype=dtype)
    manifest = load_manifest(shard_dir)
    n_img = num_image_tokens(model.config)
    if cfg.k > len(tok):
        raise CacheError(f"cache.k = {cfg.k} exceeds the teacher's vocabulary ({len(tok)} tokens)")
    fp = cache_fingerprint(teacher_dir, manifest, cfg, len(tok))
    max_len = fp["max_len"]  # records are truncated as the fingerprint says
    if dctx.is_main:
        writer = CacheWriter(out, fp)  # creates the root (or checks its fingerprint) before others open it
    if dctx.world_size > 1:
        dist.barrier()
    if not dctx.is_main:
        writer = CacheWriter(out, fp)
    mine = shards_for_rank(manifest, dctx.rank, dctx.world_size)
    todo = writer.pending(mine)
    by_name = {s["name"]: s for s in manifest["shards"]}
    total_records = sum(by_name[s]["records"] for s in todo)
    bar = tqdm(
        total=total_records, unit="rec", disable=not progress, desc=f"teacher cache (rank {dctx.rank})"
    )
    signals = functools.partial(
        teacher_signals, model, k=cfg.k, pooling=cfg.pooling, prefix_reuse=cfg.prefix_reuse
    )

    def collate_fn(examples: list[Example]) -> Batch:
        return collate(examples, tok, transform, n_img, max_len, tok.pad_token_id)

    tokens = done = 0
    t0 = time.perf_counter()

    def on_batch(n_records: int, n_tokens: int) -> None:
        nonlocal done
        done += n_tokens
        bar.update(n_records)
        bar.set_postfix(tok_s=f"{done / max(1e-9, time.perf_counter() - t0):.0f}")

    for name in todo:
        with writer.shard(name) as sw:
            batches = shard_batches(shard_dir / name, cfg.batch_size, collate_fn)
            tokens += build_shard(signals, batches, sw, overlap=device.type == "cuda", on_batch=on_batch)
    bar.close()
    if dctx.world_size > 1:
        dist.barrier()
    seconds = time.perf_counter() - t0
    return {
        "rank": dctx.rank,
        "shards_built": len(todo),
        "shards_kept": len(mine) - len(todo),
        "records": total_records,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "fingerprint": fp,
    }
