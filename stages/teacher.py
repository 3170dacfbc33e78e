"""Train the tiny teacher by SFT (embedded default) or adopt a local checkpoint.

    python stages/teacher.py            # data/shards + models/tokenizer -> models/teacher/

Reads params `teacher.*`. Either way models/teacher/ gets a fingerprint (weights + tokenizer sha256)
that the teacher cache records. Training logs to dvclive/teacher/; a killed run resumes from
checkpoints/teacher/.
"""

import json
from pathlib import Path

from geodistill.config import load_section
from geodistill.distill.sft import RunPaths, run_key, sft_stage
from geodistill.models.checkpoints import adopt, check_checkpoint
from geodistill.models.llava import build_llava
from geodistill.models.tokenizer import check_compatible, load_tokenizer, tokenizer_hash
from geodistill.models.transform import ImageTransform

MODEL = "teacher"
SHARDS, TOKENIZER = Path("data/shards"), Path("models/tokenizer")
PATHS = RunPaths(Path("models") / MODEL, Path("dvclive") / MODEL, Path("checkpoints") / MODEL)

if __name__ == "__main__":
    cfg = load_section("teacher")
    tok = load_tokenizer(TOKENIZER)
    if cfg.source == "path":
        check_compatible(check_checkpoint(cfg.path)[1], tok)
        info = adopt(cfg.path, PATHS.out)
        print(f"teacher: adopted {info['path']} (weights sha256 {info['weights_sha256'][:12]})")
    else:
        model = build_llava(cfg.arch, tok, cfg.train.seed)
        manifest = json.loads((SHARDS / "train/manifest.json").read_text())
        key = run_key(MODEL, cfg, tokenizer_hash(tok), manifest)
        sft_stage(model, tok, ImageTransform(cfg.arch.image_size), cfg.train, SHARDS, PATHS, key=key)
