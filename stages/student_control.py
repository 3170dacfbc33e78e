"""The equal-compute control: the baseline trained further by SFT for exactly the steps, batch size,
learning-rate schedule and batch order that `distill` uses, so the report separates what distillation
adds from what more training adds.

    python stages/student_control.py    # models/student_sft -> models/student_control/

Reads params `student.*` (freezing, LoRA) and `distill.train`. Logs to dvclive/student_control/; a killed
run resumes from checkpoints/student_control/.
"""

from pathlib import Path

from geodistill.config import load_section
from geodistill.distill.sft import RunPaths, prepare_trainable, run_key, sft_stage
from geodistill.models.checkpoints import load_for_training, model_fingerprint

MODEL = "student_control"
PATHS = RunPaths(Path("models") / MODEL, Path("dvclive") / MODEL, Path("checkpoints") / MODEL)
SHARDS, BASE = Path("data/shards"), Path("models/student_sft")

if __name__ == "__main__":
    student, distill = load_section("student"), load_section("distill")
    model, tok, transform = load_for_training(BASE)
    model = prepare_trainable(model, student)
    key = run_key(MODEL, student, distill.train, model_fingerprint(BASE))
    sft_stage(model, tok, transform, distill.train, SHARDS, PATHS, key=key)
