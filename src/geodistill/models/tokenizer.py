"""A compact, offline-built tokenizer for GeoChat text; tokenizer fingerprints and compatibility.

``build_tokenizer`` trains a byte-level BPE (GPT-2 pre-tokenisation: words keep their leading space,
digits and punctuation split off) on the prepared corpus with the ``tokenizers`` library and wraps it
as a ``PreTrainedTokenizerFast`` that ``AutoTokenizer`` loads back without remote code.

Design choices (measured on the synthetic benchmark at vocab 512):

- **Alphabet: printable ASCII + the corpus's own bytes, not all 256 bytes.** A full byte alphabet costs
  256 ids, which at vocab 512 leaves ~140 merges (2.8 characters per token); the ASCII alphabet leaves
  ~300 merges (4.0 characters per token, ~30% shorter sequences). Any ASCII text, and any text made of
  characters seen in the corpus, round-trips exactly; a byte never seen becomes ``<unk>``. Pass
  ``all_bytes=True`` for arbitrary UTF-8 (large vocabularies, foreign corpora).
- **Boxes and markup are atomic added tokens** (never merged with neighbours): ``<0>``..``<100>``,
  ``<p>``, ``</p>``, the task tokens and ``{``, ``}``, ``|``. A box ``{<8><82><16><90>|<69>}`` is 7
  tokens whatever the numbers. They are *not* special: ``decode(..., skip_special_tokens=True)`` keeps
  them (answers are boxes).
- **Special tokens** ``<unk>`` (0), ``<s>`` (1), ``</s>`` (2), ``<pad>`` (3), ``<image>`` (4), as in
  Llama's first ids. ``encode`` adds no ``<s>``: the conversation template adds bos/eos itself, so
  ``decode(encode(text)) == text``.
- No normaliser, no clean-up of spaces: decoding is the exact inverse of encoding.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from geodistill.errors import ModelError

UNK, BOS, EOS, PAD, IMAGE = "<unk>", "<s>", "</s>", "<pad>", "<image>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, IMAGE)
"""Special tokens in id order (ids 0..4)."""
COORD_TOKENS = tuple(f"<{i}>" for i in range(101))
"""GeoChat's 0-100 box grid."""
MARKUP_TOKENS = ("<p>", "</p>", "[grounding]", "[identify]", "[refer]", "{", "}", "|")
"""Phrase, task and box delimiters."""
ADDED_TOKENS = COORD_TOKENS + MARKUP_TOKENS
"""Atomic, non-special tokens."""

# ASCII printable characters plus tab, newline and carriage return.
_ASCII_BYTES = (*range(0x20, 0x7F), 0x09, 0x0A, 0x0D)
_ADDED_RE = re.compile(
    "|".join(re.escape(t) for t in sorted(ADDED_TOKENS + SPECIAL_TOKENS, key=len, reverse=True))
)


def _ascii_chars() -> list[str]:
    """The ByteLevel alphabet characters of the ASCII bytes (GPT-2's byte -> unicode map, ' ' -> 'Ġ')."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    # An ASCII character is one UTF-8 byte, so it maps to exactly one alphabet character.
    return [pre.pre_tokenize_str(chr(b))[0][0] for b in _ASCII_BYTES]


def _pieces(texts: Iterable[str]) -> Iterator[str]:
    """Training text with the added tokens cut out, as encoding sees it (they are split off first)."""
    for text in texts:
        for piece in _ADDED_RE.split(text):
            if piece:
                yield piece


def build_tokenizer(
    texts: Iterable[str], vocab_size: int, *, all_bytes: bool = False
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` with GeoChat's special and box tokens.

    ``vocab_size`` counts everything (special, alphabet, merges, box and markup tokens); the result has
    at most that many tokens (fewer when the corpus runs out of merges). Deterministic for the same texts.
    ``all_bytes`` puts all 256 bytes in the alphabet so any UTF-8 text round-trips (costs ~160 ids).
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet()) if all_bytes else _ascii_chars()
    # Added tokens that are single alphabet characters ({ } |) reuse their alphabet id.
    new_added = [t for t in ADDED_TOKENS if t not in alphabet]
    train_size = vocab_size - len(new_added)
    minimum = len(SPECIAL_TOKENS) + len(alphabet) + len(new_added)
    if vocab_size <= minimum:
        raise ModelError(
            f"vocab_size {vocab_size} is too small: special tokens, the byte alphabet and the box/markup "
            f"tokens alone take {minimum}; use a vocab_size of at least {minimum + 64}"
        )
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=train_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(_pieces(texts), trainer)
    # Added after training so their ids follow the learnt vocabulary and never collide with it.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    if tok.get_vocab_size() > vocab_size:
        raise ModelError(
            f"the corpus has {tok.get_vocab_size() - vocab_size} more distinct characters than vocab_size "
            f"{vocab_size} leaves room for; raise tokenizer.vocab_size"
        )
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """A ``tokenizers.Tokenizer`` with this module's special tokens as a transformers tokenizer."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        # A named extra special token: saved in tokenizer_config.json, gives tok.image_token(_id).
        extra_special_tokens={"image_token": IMAGE},
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )


def save_tokenizer(tok: PreTrainedTokenizerFast, path: str | Path) -> None:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` (``AutoTokenizer``-loadable)."""
    tok.save_pretrained(str(path))


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer folder (or a checkpoint's tokenizer) from local files only."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ModelError(
            f"{path}: no such tokenizer folder; build one (tokenizer.source: build) or fix the path"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, ImportError) as e:
        raise ModelError(
            f"{path}: cannot load a tokenizer ({e}). It needs tokenizer.json (or tokenizer.model with the "
            "'sentencepiece' and 'protobuf' packages installed) and tokenizer_config.json"
        ) from e


def image_token_id(tok: PreTrainedTokenizerFast) -> int:
    """Id of ``<image>``; a ModelError when the tokenizer has none."""
    tid = tok.convert_tokens_to_ids(IMAGE)
    if tid is None or (tid == tok.unk_token_id and tok.unk_token != IMAGE):
        raise ModelError(
            f"the tokenizer has no {IMAGE} token; add it (convert.py does for GeoChat checkpoints) "
            "and resize the model's embeddings to len(tokenizer)"
        )
    return int(tid)


def tokenizer_hash(tok: PreTrainedTokenizerFast) -> str:
    """sha256 of what decides token ids: model (vocab + merges), pre-tokeniser, decoder, normaliser,
    added tokens and the special-token roles. Stable across save/load (serialisation details excluded)."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    added = sorted(
        (t["id"], t["content"], bool(t["special"]), bool(t.get("lstrip")), bool(t.get("rstrip")))
        for t in spec.get("added_tokens", [])
    )
    canon = {
        "model": spec.get("model"),
        "normalizer": spec.get("normalizer"),
        "pre_tokenizer": spec.get("pre_tokenizer"),
        "decoder": spec.get("decoder"),
        "added_tokens": added,
        "roles": {name: getattr(tok, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")},
        "size": len(tok),
    }
    blob = json.dumps(canon, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def check_compatible(teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase) -> None:
    """Raise ModelError naming what differs when teacher and student do not share one tokenizer.

    Distillation compares the two next-token distributions id by id (and the cache stores teacher
    token ids), so the vocabularies must be identical, not merely the same size.
    """
    diffs = []
    if len(teacher_tok) != len(student_tok):
        diffs.append(f"vocabulary size {len(teacher_tok)} (teacher) vs {len(student_tok)} (student)")
    for role in ("bos", "eos", "pad", "unk"):
        a, b = getattr(teacher_tok, f"{role}_token_id"), getattr(student_tok, f"{role}_token_id")
        if a != b:
            diffs.append(f"{role} id {a} vs {b}")
    try:
        ia, ib = image_token_id(teacher_tok), image_token_id(student_tok)
        if ia != ib:
            diffs.append(f"<image> id {ia} vs {ib}")
    except ModelError as e:
        diffs.append(str(e))
    ha, hb = tokenizer_hash(teacher_tok), tokenizer_hash(student_tok)
    if ha != hb:
        va, vb = teacher_tok.get_vocab(), student_tok.get_vocab()
        moved = sorted(t for t in va.keys() & vb.keys() if va[t] != vb[t])[:3]
        only = sorted(va.keys() ^ vb.keys())[:3]
        detail = f"tokenizer hash {ha[:12]} vs {hb[:12]}"
        if moved:
            detail += f"; tokens with other ids: {moved}"
        if only:
            detail += f"; tokens in only one vocabulary: {only}"
        diffs.append(detail)
    if diffs:
        raise ModelError(
            "teacher and student tokenizers differ: "
            + "; ".join(diffs)
            + ". The student must use the teacher's tokenizer (build the student from it)"
        )
