"""The teacher pass: one batched, teacher-forced forward over every record, stored in the Zarr cache.

Per assistant token: the teacher's top-k ids and log-probs normalised over the full vocabulary (so the
tail mass is exact) and the exact log-prob of the ground-truth token. Per image: the projector outputs
(optionally average-pooled). Keys: a record is ``<sample key>#<index in sample>`` and an image is its
sample key, both unique by construction (GeoChat's own ids repeat across an image's records).

Work is split by shard: rank r of W builds shards r, r+W, ... (``torchrun --nproc_per_node W``). Each
shard group is written by one process and marked complete last, so a killed run resumes by rebuilding
only incomplete groups. Records are batched within a shard in order, so the content is the same for
any number of ranks.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from geodistill.cache.store import CacheWriter, make_fingerprint
from geodistill.config import CacheConfig
from geodistill.data.collate import Example, collate
from geodistill.data.shards import iter_shard, load_manifest, manifest_hash, shards_for_rank
from geodistill.data.template import TEMPLATE_NAME
from geodistill.distributed import Dist
from geodistill.models.checkpoints import load, model_fingerprint
from geodistill.models.factory import capture_projector, num_image_tokens
from geodistill.models.features import pool_image_features


def record_key(sample_key: str, index: int) -> str:
    return f"{sample_key}#{index}"


def cache_fingerprint(
    teacher_dir: Path, manifest: dict[str, Any], cfg: CacheConfig, vocab_size: int, max_len: int
) -> dict[str, Any]:
    """What the cache content depends on; a reader with another fingerprint is refused."""
    fp = model_fingerprint(teacher_dir)
    return make_fingerprint(
        teacher_sha256=fp["weights_sha256"],
        tokenizer_sha256=fp["tokenizer_sha256"],
        manifest_sha256=manifest_hash(manifest),
        template=TEMPLATE_NAME,
        vocab_size=vocab_size,
        k=cfg.k,
        pooling=cfg.pooling,
        encoding=cfg.encoding,
        max_len=max_len,
    )


@dataclass
class TeacherOutput:
    """Per-record top-k signals of one batch, plus per-row projector features."""

    topk_ids: list[np.ndarray]  # per record (n, k) int64
    topk_logprobs: list[np.ndarray]  # per record (n, k) float32
    target_logprob: list[np.ndarray]  # per record (n,) float32
    features: torch.Tensor  # (B, P', D) float32, pooled


@torch.inference_mode()
def teacher_signals(model: torch.nn.Module, batch, k: int, pooling: int) -> TeacherOutput:
    """Teacher-forced forward of one collated batch -> top-k signals at every supervised position."""
    with capture_projector(model) as cap:
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values
        ).logits  # (B, T, V)
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V): position t predicts token t+1
    targets = batch.labels[:, 1:]  # (B, T-1)
    sel = targets != -100
    lp_sel = logp[sel]  # (N, V) rows in row-major order = each record's assistant tokens in turn order
    top_lp, top_ids = lp_sel.topk(min(k, lp_sel.shape[-1]), dim=-1)  # (N, k), sorted descending
    tgt = lp_sel.gather(-1, targets[sel].unsqueeze(-1)).squeeze(-1)  # (N,)
    counts = sel.sum(1).tolist()
    ids_np, lps_np, tgt_np = top_ids.numpy(), top_lp.numpy(), tgt.numpy()
    out = TeacherOutput([], [], [], pool_image_features(cap.features.float(), pooling))
    start = 0
    for n in counts:
        out.topk_ids.append(ids_np[start : start + n])
        out.topk_logprobs.append(lps_np[start : start + n])
        out.target_logprob.append(tgt_np[start : start + n])
        start += n
    return out


def _shard_batches(path: Path, batch_size: int) -> Iterator[tuple[list[Example], list[str], list[str]]]:
    """(examples, record keys, image keys) chunks of one shard, in order."""
    chunk: list[Example] = []
    keys: list[str] = []
    images: list[str] = []
    for sample in iter_shard(path):
        for i, rec in enumerate(sample.records):
            chunk.append(Example(rec, sample.image_bytes, sample.key, i))
            keys.append(record_key(sample.key, i))
            images.append(sample.key)
            if len(chunk) == batch_size:
                yield chunk, keys, images
                chunk, keys, images = [], [], []
    if chunk:
        yield chunk, keys, images


def build_cache(
    teacher_dir: Path, shard_dir: Path, out: Path, cfg: CacheConfig, *, progress: bool = True
) -> dict[str, Any]:
    """Build (or resume) the cache for this process's shards; returns counts and throughput."""
    dctx = Dist.from_env()
    dctx.init()
    model, tok, transform = load(teacher_dir, dtype=torch.float32)
    model.eval()
    manifest = load_manifest(shard_dir)
    n_img = num_image_tokens(model.config)
    max_len = int(model.config.text_config.max_position_embeddings)
    fp = cache_fingerprint(teacher_dir, manifest, cfg, len(tok), max_len)
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
    tokens = 0
    t0 = time.perf_counter()
    for name in todo:
        seen_images: set[str] = set()
        with writer.shard(name) as sw:
            for examples, keys, images in _shard_batches(shard_dir / name, cfg.batch_size):
                batch = collate(examples, tok, transform, n_img, max_len, tok.pad_token_id)
                sig = teacher_signals(model, batch, cfg.k, cfg.pooling)
                feats = sig.features.numpy()
                for row, key in enumerate(keys):
                    sw.add_record(key, sig.topk_ids[row], sig.topk_logprobs[row], sig.target_logprob[row])
                    tokens += len(sig.target_logprob[row])
                    # All records of an image share its features; store them once (the first record's).
                    if images[row] not in seen_images:
                        seen_images.add(images[row])
                        sw.add_image(images[row], feats[row])
                bar.update(len(keys))
                bar.set_postfix(tok_s=f"{tokens / max(1e-9, time.perf_counter() - t0):.0f}")
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
