"""Train the baseline student (the GeoChat-7B role) by SFT on ground truth.

    python stages/student_sft.py        # data/shards + models/tokenizer -> models/student_sft/

Reads params `student.*` and `sft.*`.
"""

import json
from pathlib import Path

from geodistill.config import load_section
from geodistill.distill.sft import make_student, prepare_trainable, run_key, sft_stage
from geodistill.models.tokenizer import load_tokenizer, tokenizer_hash

SHARDS, TOKENIZER, OUT = Path("data/shards"), Path("models/tokenizer"), Path("models/student_sft")

if __name__ == "__main__":
    student, sft = load_section("student"), load_section("sft")
    tok = load_tokenizer(TOKENIZER)
    model, transform = make_student(student, tok)
    model = prepare_trainable(model, student)
    key = run_key(
        "student_sft",
        student,
        sft,
        tokenizer_hash(tok),
        json.loads((SHARDS / "train/manifest.json").read_text()),
    )
    summary = sft_stage(model, tok, transform, sft.train, SHARDS, OUT, name="student_sft", key=key)
    (OUT / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
