"""Bytes per token on disk and decoding error of each top-k encoding, on synthetic teacher outputs.

    python -m geodistill.bench.codec [--tokens 16384] [--vocab 32000] [--ks 8 16 32 64]

Each encoding's arrays (the pipeline's default encoding is float16, ``cache.encoding``) are written
through the real store (``CacheWriter``, Blosc zstd-3 + shuffle) and measured as the bytes of their
chunk files. The synthetic next-token distributions mimic an LLM's: a
Zipf prior over ids (BPE ids are roughly frequency-ordered), Gumbel context noise, a per-position
sharpness, and one boosted "answer" token, so that the top-1 probability spreads from ~0.25 to ~1
(median ~0.8) and the top1 -> top2 gap from 0.3 to 16 nats. Real teachers differ; rerun on a real
cache's inputs before trusting the last digit.

Columns: ``ids``/``values`` bytes per token; ``raw`` = uncompressed uint16 ids + float16 values (4k);
``max|err|`` the largest log-prob error; ``p-mean|err|`` the probability-weighted mean error (what a
KL gradient feels); ``max|tail err|`` the largest error of the tail mass; ``KL`` the mean (k+1)-bucket
KL(true || decoded), i.e. the divergence floor the encoding itself adds.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from geodistill.cache import codec, store
from geodistill.cache.fingerprint import scratch_fingerprint
from geodistill.config import CacheConfig
from geodistill.markdown import table


def synthetic_topk(
    n: int, vocab: int, k: int, seed: int = 0, batch: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """ids (n, k) int64 and log-probs (n, k) float32 (normalised over ``vocab``, sorted descending)."""
    gen = torch.Generator().manual_seed(seed)
    prior = -torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))  # (V,) Zipf over ids
    ids, lps = [], []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        sharp = torch.exp(torch.randn(b, 1, generator=gen) * 0.5)  # (b, 1) per-position sharpness
        gumbel = -torch.log(-torch.log(torch.rand(b, vocab, generator=gen).clamp_min(1e-12)))
        logits = sharp * (prior + 2.0 * gumbel)  # (b, V)
        answer = torch.randint(0, vocab, (b,), generator=gen)
        logits[torch.arange(b), answer] += torch.rand(b, generator=gen) * 25
        v, i = torch.topk(torch.log_softmax(logits, dim=1), k, dim=1)
        ids.append(i.numpy())
        lps.append(v.numpy())
    return np.concatenate(ids), np.concatenate(lps)


def _disk_bytes(path: Path) -> int:
    """Bytes of an array's chunk files (its metadata excluded: constant per shard, not per token)."""
    return sum(p.stat().st_size for p in (path / "c").rglob("*") if p.is_file())


def _kl_with_tail(p_lp: np.ndarray, q_lp: np.ndarray) -> np.ndarray:
    """(N,) KL(p || q) over the k top-k buckets plus one tail bucket, float64."""
    p_tail = np.clip(1 - np.exp(p_lp).sum(1), 1e-12, 1)
    q_tail = np.clip(1 - np.exp(q_lp).sum(1), 1e-12, 1)
    return (np.exp(p_lp) * (p_lp - q_lp)).sum(1) + p_tail * (np.log(p_tail) - np.log(q_tail))


def measure(ids: np.ndarray, lp: np.ndarray, vocab: int, encoding: str, workdir: Path) -> dict[str, float]:
    """Write (N, k) ids/log-probs as one shard with ``encoding``; sizes per token and decoding errors."""
    n, k = lp.shape
    path = workdir / f"{encoding}-{k}.zarr"
    writer = store.CacheWriter(path, scratch_fingerprint(vocab, k, encoding))
    t0 = time.perf_counter()
    with writer.shard("bench") as w:
        for start in range(0, n, 128):  # records of 128 tokens
            stop = min(n, start + 128)
            w.add_record(f"r{start}", ids[start:stop], lp[start:stop], lp[start:stop, 0])
    t_write = time.perf_counter() - t0
    value_names = list(codec.value_arrays(encoding, k))
    id_bytes = _disk_bytes(path / "bench" / "topk_ids")
    val_bytes = sum(_disk_bytes(path / "bench" / name) for name in value_names)
    t0 = time.perf_counter()
    g = writer.root["bench"]
    dec = codec.decode_values({name: g[name][:] for name in value_names}, encoding).astype(np.float64)
    t_read = time.perf_counter() - t0
    true = lp.astype(np.float64)
    err = np.abs(dec - true)
    p = np.exp(true)
    return {
        "ids": id_bytes / n,
        "values": val_bytes / n,
        "total": (id_bytes + val_bytes) / n,
        "raw": 4.0 * k,
        "max_err": float(err.max()),
        "pmean_err": float((err * p).sum() / p.sum()),
        "tail_err": float(np.abs(np.exp(dec).sum(1) - p.sum(1)).max()),
        "kl": float(_kl_with_tail(true, dec).mean()),
        "write_tok_s": n / t_write,
        "read_tok_s": n / t_read,
    }


COLUMNS = ["k", "encoding", "ids", "values", "total", "raw u16+f16", "max abs err", "p-mean abs err"]
COLUMNS += ["max tail err", "KL(k+1)", "write tok/s", "read tok/s"]


def row(k: int, encoding: str, m: dict[str, float]) -> list[str]:
    """One table row of :func:`measure`'s numbers, in COLUMNS order."""
    sizes = [f"{m[c]:.2f}" for c in ("ids", "values", "total")] + [f"{m['raw']:.0f}"]
    errors = [f"{m[c]:.2g}" for c in ("max_err", "pmean_err", "tail_err", "kl")]
    speeds = [f"{m[c]:.3g}" for c in ("write_tok_s", "read_tok_s")]
    return [str(k), encoding, *sizes, *errors, *speeds]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--ks", type=int, nargs="+", default=sorted({8, CacheConfig().k, 32, 64}))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ids, lp = synthetic_topk(args.tokens, args.vocab, max(args.ks), args.seed)
    print(f"{args.tokens} tokens, V = {args.vocab}; bytes per token on disk (zstd-3 + shuffle)\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.ks:
            for encoding in codec.ENCODINGS:
                m = measure(ids[:, :k], np.ascontiguousarray(lp[:, :k]), args.vocab, encoding, Path(tmp))
                rows.append(row(k, encoding, m))
    print(table(COLUMNS, rows))


if __name__ == "__main__":
    main()
