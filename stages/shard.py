"""Pack the prepared splits into WebDataset shards (one sample per image) with manifests.

    python stages/shard.py              # data/prepared -> data/shards/{train,val}/

Reads params `shard.*`.
"""

from pathlib import Path

from geodistill.config import load_section
from geodistill.data.prepare import image_root
from geodistill.data.shards import write_shards

PREPARED, OUT = Path("data/prepared"), Path("data/shards")

if __name__ == "__main__":
    cfg = load_section("shard")
    for split in ("train", "val"):
        m = write_shards(
            PREPARED / f"{split}.jsonl",
            image_root(PREPARED),
            OUT / split,
            maxcount=cfg.maxcount,
            maxsize=cfg.maxsize,
        )
        t = m["totals"]
        print(f"{split}: {len(m['shards'])} shards, {t['samples']} images, {t['records']} records")
