"""Build (or adopt) the tokenizer teacher and student share.

    python stages/tokenizer.py          # data/prepared -> models/tokenizer/

Reads params `tokenizer.*`. `build` trains a byte-level BPE offline on the prepared corpus with
GeoChat's box/markup tokens atomic; `path` copies the tokenizer of a local checkpoint.
"""

import json
from pathlib import Path

from geodistill.config import load_section
from geodistill.data.template import SYSTEM
from geodistill.models.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer, tokenizer_hash

PREPARED, OUT = Path("data/prepared"), Path("models/tokenizer")


def corpus():
    yield from [SYSTEM + " USER: ", " ASSISTANT: "] * 100  # the template is in every sequence
    for split in ("train.jsonl", "pretrain.jsonl"):
        with (PREPARED / split).open() as f:
            for line in f:
                obj = json.loads(line)
                if "text" in obj:
                    yield obj["text"]
                for turn in obj.get("conversations", []):
                    yield turn["value"].replace("<image>", "")


if __name__ == "__main__":
    cfg = load_section("tokenizer")
    tok = build_tokenizer(corpus(), cfg.vocab_size) if cfg.source == "build" else load_tokenizer(cfg.path)
    save_tokenizer(tok, OUT)
    print(f"tokenizer: {len(tok)} tokens, sha256 {tokenizer_hash(tok)[:12]}")
