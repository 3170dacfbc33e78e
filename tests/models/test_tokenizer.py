"""The offline GeoChat tokenizer: exact round trips, atomic box tokens, stable fingerprints."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from geodistill.data.synthetic import make_scene, train_records
from geodistill.data.template import SYSTEM, encode_conversation
from geodistill.errors import ModelError
from geodistill.models.tokenizer import (
    ADDED_TOKENS,
    COORD_TOKENS,
    build_tokenizer,
    check_compatible,
    image_token_id,
    load_tokenizer,
    save_tokenizer,
    tokenizer_hash,
)

BOX = "{<8><82><16><90>|<69>}"


@pytest.fixture(scope="module")
def records():
    rng = np.random.default_rng(0)
    return [r for i in range(6) for r in train_records(make_scene(f"img{i}", 0, 64, 8), 8, rng)]


@pytest.fixture(scope="module")
def corpus(records):
    texts = [t.value for r in records for t in r.conversations]
    return [*texts, f"{SYSTEM} USER: ASSISTANT:"]


@pytest.fixture(scope="module")
def tok(corpus):
    return build_tokenizer(corpus, 512)


def test_special_token_ids(tok):
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert image_token_id(tok) == 4
    assert len(tok) <= 512


def test_round_trip_on_records_and_awkward_spacing(tok, records):
    texts = [t.value for r in records for t in r.conversations]
    texts += [
        f" leading space, then a box {BOX}{{<1><2><3><4>}} and trailing  ",
        "two  spaces\n\nand new lines\tand a tab",
        "[grounding] <p>a ship</p> {<0><0><100><100>|<-45>}",
        "<image>\nWhat is here? ASSISTANT: 3 ships.</s>",
    ]
    for text in texts:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
        assert tok.decode(tok.encode(text)) == text  # encode adds no <s>: the template does


def test_boxes_and_markup_are_atomic(tok):
    ids = tok.encode(BOX, add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == ["{", "<8>", "<82>", "<16>", "<90>", "|", "<69>", "}"]
    for t in ADDED_TOKENS:
        assert len(tok.encode(t, add_special_tokens=False)) == 1, t
    assert len({tok.convert_tokens_to_ids(t) for t in COORD_TOKENS}) == 101
    # Inside text the markup still splits off cleanly.
    assert tok.convert_ids_to_tokens(tok.encode("x<p>ship</p>{", add_special_tokens=False))[1] == "<p>"


def test_boxes_survive_skip_special_tokens_but_image_does_not(tok):
    text = f"<image>the ship {BOX}</s>"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == f"the ship {BOX}"


def test_compact_on_geochat_text(tok, records):
    """Frequent words become single tokens: a grounded description averages > 3 characters per token."""
    text = next(t.value for r in records if r.task == "grounding_description" for t in r.conversations[1:])
    assert len(text) / len(tok.encode(text, add_special_tokens=False)) > 3


def test_unseen_bytes_become_unk_unless_all_bytes(corpus):
    small = build_tokenizer(corpus, 512)
    text = "café 北京"
    assert small.unk_token_id in small.encode(text, add_special_tokens=False)
    full = build_tokenizer(corpus, 600, all_bytes=True)
    assert full.decode(full.encode(text, add_special_tokens=False)) == text


def test_deterministic_and_hash_sensitive(corpus, tok):
    again = build_tokenizer(corpus, 512)
    assert tokenizer_hash(again) == tokenizer_hash(tok)
    assert tokenizer_hash(build_tokenizer(corpus, 400)) != tokenizer_hash(tok)


def test_save_load_keeps_ids_and_hash(tok, tmp_path):
    save_tokenizer(tok, tmp_path)
    for loaded in (load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)):
        assert tokenizer_hash(loaded) == tokenizer_hash(tok)
        assert len(loaded) == len(tok)
        assert image_token_id(loaded) == image_token_id(tok)
        text = f"[refer] <p>the red ship</p> {BOX}"
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(loaded.encode(text)) == text


def test_template_expands_image_tokens(tok, records):
    enc = encode_conversation(tok, records[0].conversations, num_image_tokens=16)
    assert enc.input_ids.count(image_token_id(tok)) == 16
    assert enc.input_ids[0] == tok.bos_token_id and enc.input_ids[-1] == tok.eos_token_id


def test_too_small_vocab_is_refused(corpus):
    with pytest.raises(ModelError, match="vocab_size"):
        build_tokenizer(corpus, 150)


def test_missing_image_token_is_reported(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab={"<unk>": 0}, merges=[], unk_token="<unk>"))
    )
    bare.unk_token = "<unk>"
    with pytest.raises(ModelError, match="<image>"):
        image_token_id(bare)
    with pytest.raises(ModelError, match="no such tokenizer folder"):
        load_tokenizer(tmp_path / "nope")


def test_check_compatible():
    corpus = [
        "The image shows a harbor area with 2 ships: <p>a red ship</p> {<8><82><16><90>|<69>}.",
        "[refer] <p>the white airplane</p>",
        "How many vehicles are there? Answer the question using a single word or phrase.",
        "A chat between a curious user and an artificial intelligence assistant. USER: ASSISTANT:",
    ] * 4
    tok = build_tokenizer(corpus, 300)
    check_compatible(tok, build_tokenizer(corpus, 300))  # rebuilt identically: fine
    with pytest.raises(ModelError, match="vocabulary size"):
        check_compatible(tok, build_tokenizer(corpus, 260))
    # Same size, other merges: only the fingerprint tells them apart.
    a = build_tokenizer(corpus, 230)
    b = build_tokenizer(["zebra quartz jumping over lazy foxes, quickly and often"] * 8 + corpus, 230)
    assert len(a) == len(b)
    with pytest.raises(ModelError, match="hash"):
        check_compatible(a, b)
