"""Distil the teacher into the baseline student from the cached teacher signals.

    python stages/distill.py                                     # one process
    torchrun --nproc_per_node 2 stages/distill.py                # DDP (or DeepSpeed: distill.deepspeed)

models/student_sft + data/teacher_cache.zarr (+ models/teacher only when distill.onpolicy.enabled)
-> models/student_kd/, dvclive/distill/. Reads params `distill.*`, `cache.*` (the cache fingerprint)
and `student.*` (freezing, LoRA).
"""

import json
from pathlib import Path

from geodistill.config import load_section
from geodistill.distill.kd import run_distill

OUT = Path("models/student_kd")

if __name__ == "__main__":
    summary = run_distill(
        load_section("distill"),
        load_section("cache"),
        load_section("student"),
        shards=Path("data/shards"),
        cache_path=Path("data/teacher_cache.zarr"),
        base_dir=Path("models/student_sft"),
        teacher_dir=Path("models/teacher"),
        out=OUT,
    )
    if OUT.exists():
        (OUT / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
