"""Distil the teacher into the baseline student from the cached teacher signals.

    python stages/distill.py                                     # one process
    torchrun --nproc_per_node 2 stages/distill.py                # DDP (or DeepSpeed: distill.deepspeed)

models/student_sft + data/teacher_cache.zarr (+ models/teacher only when distill.onpolicy.enabled)
+ data/prepared/pretrain.jsonl (L_PT) -> models/student_kd/, dvclive/student_kd/. Reads params
`distill.*`, `cache.*` (the cache fingerprint) and `student.*` (freezing, LoRA). A killed run resumes
from checkpoints/student_kd/ (every distill.train.checkpoint_every steps).
"""

from pathlib import Path

from geodistill.config import load_section
from geodistill.distill.kd import run_distill
from geodistill.distill.sft import RunPaths

MODEL = "student_kd"
PATHS = RunPaths(Path("models") / MODEL, Path("dvclive") / MODEL, Path("checkpoints") / MODEL)

if __name__ == "__main__":
    run_distill(
        load_section("distill"),
        load_section("cache"),
        load_section("student"),
        shards=Path("data/shards"),
        cache_path=Path("data/teacher_cache.zarr"),
        base_dir=Path("models/student_sft"),
        teacher_dir=Path("models/teacher"),
        prepared=Path("data/prepared"),
        paths=PATHS,
    )
