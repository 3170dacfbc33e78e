"""The equal-compute control: the baseline trained further by SFT for exactly the steps, batch size,
learning-rate schedule and batch order that `distill` uses, so the report separates what distillation
adds from what more training adds.

    python stages/student_control.py    # models/student_sft -> models/student_control/

Reads params `student.*` (freezing, LoRA) and `distill.train`.
"""

import json
from pathlib import Path

from geodistill.config import load_section
from geodistill.distill.sft import prepare_trainable, run_key, sft_stage
from geodistill.models.checkpoints import load_for_training, model_fingerprint

SHARDS, BASE, OUT = Path("data/shards"), Path("models/student_sft"), Path("models/student_control")

if __name__ == "__main__":
    student, distill = load_section("student"), load_section("distill")
    model, tok, transform = load_for_training(BASE)
    model = prepare_trainable(model, student)
    key = run_key("student_control", student, distill.train, model_fingerprint(BASE))
    summary = sft_stage(model, tok, transform, distill.train, SHARDS, OUT, name="student_control", key=key)
    (OUT / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
