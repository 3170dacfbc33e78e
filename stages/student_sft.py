"""Train the baseline student (the GeoChat-7B role) by SFT on ground truth.

    python stages/student_sft.py        # data/shards + models/tokenizer -> models/student_sft/

Reads params `student.*` and `sft.*`. Logs to dvclive/student_sft/; a killed run resumes from
checkpoints/student_sft/.
"""

import json
from pathlib import Path

from geodistill.config import load_section
from geodistill.distill.sft import RunPaths, make_student, prepare_trainable, run_key, sft_stage
from geodistill.models.tokenizer import load_tokenizer, tokenizer_hash

MODEL = "student_sft"
PATHS = RunPaths(Path("models") / MODEL, Path("dvclive") / MODEL, Path("checkpoints") / MODEL)
SHARDS, TOKENIZER = Path("data/shards"), Path("models/tokenizer")

if __name__ == "__main__":
    student, sft = load_section("student"), load_section("sft")
    tok = load_tokenizer(TOKENIZER)
    model, transform = make_student(student, tok)
    model = prepare_trainable(model, student)
    manifest = json.loads((SHARDS / "train/manifest.json").read_text())
    key = run_key(MODEL, student, sft, tokenizer_hash(tok), manifest)
    sft_stage(model, tok, transform, sft.train, SHARDS, PATHS, key=key)
