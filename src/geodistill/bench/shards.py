"""Shard-stage throughput: records/s and MB/s for writing and for reading back.

    python -m geodistill.bench.shards [--images 1200] [--image-size 64] [--maxcount 512]

Generates a synthetic prepared split in a temporary folder (not timed; the pipeline's scenes,
``data.synthetic``, and by default its number of training images), then times ``write_shards`` (with
``shard.maxcount``) and a full ``iter_samples`` pass (manifest sha256 verification included). Memory
stays flat in the number of records because both directions stream.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from geodistill.config import DataConfig, ShardConfig, SyntheticConfig
from geodistill.data.prepare import prepare
from geodistill.data.shards import iter_samples, write_shards


def main(argv: list[str] | None = None) -> None:
    synthetic, shard = SyntheticConfig(), ShardConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=synthetic.train_images)
    ap.add_argument("--image-size", type=int, default=synthetic.image_size)
    ap.add_argument("--maxcount", type=int, default=shard.maxcount)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        scenes = replace(
            synthetic,
            train_images=args.images,
            val_images=1,
            test_images=1,
            pretrain_texts=1,
            image_size=args.image_size,
        )
        prepare(DataConfig(synthetic=scenes), root / "prepared")
        t0 = time.perf_counter()
        m = write_shards(
            root / "prepared" / "train.jsonl",
            root / "prepared",
            root / "shards",
            maxcount=args.maxcount,
            maxsize=shard.maxsize,
        )
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        n_read = sum(len(s.records) for s in iter_samples(root / "shards"))
        t_read = time.perf_counter() - t0
        n, mb = m["totals"]["records"], m["totals"]["bytes"] / 1e6
        assert n_read == n
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"records={n} images={m['totals']['samples']} shards={len(m['shards'])} size={mb:.1f} MB")
        print(f"write: {n / t_write:,.0f} records/s  {mb / t_write:.1f} MB/s  ({t_write:.2f} s)")
        print(
            f"read : {n / t_read:,.0f} records/s  {mb / t_read:.1f} MB/s  ({t_read:.2f} s, sha256 verified)"
        )
        print(f"peak RSS: {rss:.0f} MB")


if __name__ == "__main__":
    main()
