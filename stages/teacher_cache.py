"""Run the teacher once over every training record; store top-k log-probs and projector features.

    python stages/teacher_cache.py                               # one process
    torchrun --nproc_per_node 2 stages/teacher_cache.py          # shards split across ranks

data/shards/train + models/teacher -> data/teacher_cache.zarr. Reads params `cache.*`. Resumable: a
killed run keeps completed shard groups and rebuilds the rest.
"""

import json
from pathlib import Path

from geodistill.cache.build import build_cache
from geodistill.config import load_section

SHARDS, TEACHER, OUT = Path("data/shards/train"), Path("models/teacher"), Path("data/teacher_cache.zarr")

if __name__ == "__main__":
    stats = build_cache(TEACHER, SHARDS, OUT, load_section("cache"))
    stats.pop("fingerprint")
    print(json.dumps(stats))
