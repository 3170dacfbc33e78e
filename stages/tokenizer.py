"""Build (or adopt) the tokenizer teacher and student share.

    python stages/tokenizer.py          # data/prepared -> models/tokenizer/

Reads params `tokenizer.*`. `build` trains a byte-level BPE offline on the prepared corpus with
GeoChat's box/markup tokens atomic; `path` copies the tokenizer of a local checkpoint.
"""

from pathlib import Path

from geodistill.config import load_section
from geodistill.data.prepare import tokenizer_corpus
from geodistill.models.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer, tokenizer_hash

PREPARED, OUT = Path("data/prepared"), Path("models/tokenizer")


if __name__ == "__main__":
    cfg = load_section("tokenizer")
    tok = (
        build_tokenizer(tokenizer_corpus(PREPARED), cfg.vocab_size)
        if cfg.source == "build"
        else load_tokenizer(cfg.path)
    )
    save_tokenizer(tok, OUT)
    print(f"tokenizer: {len(tok)} tokens, sha256 {tokenizer_hash(tok)[:12]}")
