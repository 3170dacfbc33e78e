"""Per-image prefix reuse: the rule (which records share which prefix) and the same signals as the plain pass
for single-record images, very different lengths, ``<image>`` in unusual places and split images."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from geodistill.cache.build import TeacherOutput, build_cache, teacher_signals
from geodistill.cache.prefix import plan_prefixes, shared_prefix_length
from geodistill.cache.store import CacheReader
from geodistill.config import CacheConfig
from geodistill.data.collate import IGNORE, Batch, Example, collate
from geodistill.data.records import Record, Turn
from geodistill.data.shards import iter_shard
from geodistill.models.checkpoints import load_for_inference
from geodistill.models.llava import num_image_tokens

IMG = 99
"""The image token id of the hand-made rows below."""
TOL = 2e-5
"""fp32 tolerance (nats) between the reused and the plain pass: different shapes, the same arithmetic
(measured <= 5e-6 on the tiny teacher); the same bound as test_build's NOISE."""


def row(*ids: int, answer_from: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpadded (ids, labels): labels supervise ids[answer_from:] (nothing when None)."""
    x = torch.tensor(ids)
    labels = torch.full_like(x, IGNORE)
    if answer_from is not None:
        labels[answer_from:] = x[answer_from:]
    return x, labels


# ------------------------------------------------------------------------------------------ the rule


def test_prefix_stops_before_the_first_difference_the_first_answer_and_the_shortest_end():
    a = row(1, 2, IMG, IMG, 5, 6, 7, 8, answer_from=6)
    b = row(1, 2, IMG, IMG, 5, 6, 9, answer_from=6)
    assert shared_prefix_length([a[0], b[0]], [a[1], b[1]], IMG) == 5  # answer at 6: predicted from 5
    c = row(1, 2, IMG, IMG, 5, 3, 3, 3, 3, answer_from=8)
    assert shared_prefix_length([a[0], c[0]], [a[1], c[1]], IMG) == 5  # first difference at 5
    same = row(1, IMG, IMG, 4)
    assert shared_prefix_length([same[0], same[0]], [same[1], same[1]], IMG) == 3  # >= 1 token left each


@pytest.mark.parametrize(
    "rows",
    [
        [row(1, 2, IMG, IMG, 5, answer_from=4)],  # one record: nothing to share
        [row(1, 2, 3, IMG, IMG, 5, 6), row(1, 2, 4, IMG, IMG, 5, 7)],  # <image> after differing text
        [row(1, 2, 3, 4, IMG, IMG), row(1, 2, 3, 5, IMG, IMG)],  # <image> at the end (after the question)
        [row(1, 2, IMG, 4, 5, IMG, 7), row(1, 2, IMG, 4, 6, IMG, 7)],  # a second image after the split
        [row(1, 2, 3, 4), row(1, 2, 3, 5)],  # no image token at all
    ],
    ids=["single", "image-after-differing-text", "image-after-question", "second-image-later", "text-only"],
)
def test_records_that_share_no_prefix_holding_the_image_take_the_plain_path(rows):
    ids, labels = zip(*rows, strict=True)
    assert shared_prefix_length(list(ids), list(labels), IMG) == 0


def test_image_in_the_middle_behind_common_text_is_shared():
    a = row(1, 2, 3, IMG, IMG, 4, 5, 6, answer_from=7)
    b = row(1, 2, 3, IMG, IMG, 4, 8, 8, 8, answer_from=7)
    assert shared_prefix_length([a[0], b[0]], [a[1], b[1]], IMG) == 6


def _batch(rows: list[tuple[torch.Tensor, torch.Tensor]], images: list[str], pixels: list[int]) -> Batch:
    t = max(len(x) for x, _ in rows)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, IGNORE)
    for i, (x, lab) in enumerate(rows):
        ids[i, : len(x)], mask[i, : len(x)], labels[i, : len(x)] = x, 1, lab
    pix = torch.stack([torch.full((3, 2, 2), float(p)) for p in pixels])
    return Batch(ids, mask, labels, pix, [str(i) for i in range(len(rows))], images, 0)


def test_plan_groups_consecutive_records_of_one_image_only():
    long = row(1, IMG, IMG, 3, 4, 5, 6, 7, 8, answer_from=5)
    short = row(1, IMG, IMG, 3, 9, answer_from=4)
    batch = _batch(
        [long, short, long, short, short, long],
        images=["a", "a", "b", "b", "a", "a"],  # "a" again later: another run
        pixels=[0, 0, 1, 2, 0, 0],  # the two "b" rows differ in pixels: not one image
    )
    plan = plan_prefixes(batch, IMG)
    assert [(g.rows, g.length) for g in plan.groups] == [([0, 1], 3), ([4, 5], 3)]
    assert plan.plain == [2, 3]


# -------------------------------------------------------------------------------- against the plain pass


def _example(key: str, index: int, question: str, answer: str, image: bytes, image_id: str) -> Example:
    turns = (Turn("human", question), Turn("gpt", answer))
    return Example(Record(f"{key}-{index}", "x.png", image_id, "vqa", turns), image, key, index)


@pytest.fixture(scope="module")
def odd_examples(pipeline) -> list[Example]:
    """Records in shard order plus made-up ones: very long and very short answers, <image> in the middle,
    after the question, single-record images, and a two-turn record."""
    samples = [s for e in pipeline.manifest["shards"] for s in iter_shard(pipeline.shards / e["name"])]
    out: list[Example] = []
    for s in samples[:3]:
        out += [Example(r, s.image_bytes, s.key, i) for i, r in enumerate(s.records)]
    a, b, c = samples[3], samples[4], samples[5]
    long = " ".join(["building"] * 60)
    out += [
        _example(a.key, 0, "<image>\nHow many buildings?", "3", a.image_bytes, "A"),
        _example(a.key, 1, "<image>\nDescribe the scene.", long, a.image_bytes, "A"),
        _example(a.key, 2, "<image>\nIs it urban?", "yes", a.image_bytes, "A"),
        _example(b.key, 0, "Look at <image>\nHow many?", "4", b.image_bytes, "B"),  # middle, shared text
        _example(b.key, 1, "Look at <image>\nWhat scene?", long, b.image_bytes, "B"),
        _example(c.key, 0, "How many? <image>", "2", c.image_bytes, "C"),  # after the question
        _example(c.key, 1, "What scene? <image>", "forest", c.image_bytes, "C"),
        _example(a.key, 9, "<image>\nAlone?", "yes", b.image_bytes, "D"),  # a single-record image
    ]
    two_turns = (Turn("human", "<image>\nHow many?"), Turn("gpt", "2"))
    two_turns += (Turn("human", "Sure?"), Turn("gpt", "yes"))
    out.append(Example(Record("E-0", "x.png", "E", "vqa", two_turns), c.image_bytes, c.key, 5))
    out.append(_example(c.key, 6, "<image>\nIs it?", "no", c.image_bytes, "E"))
    return out


def _signals(model, batch: Batch, k: int, reuse: bool) -> TeacherOutput:
    return teacher_signals(model, batch, k, pooling=2, prefix_reuse=reuse)


def _assert_close(got: TeacherOutput, want: TeacherOutput) -> None:
    assert got.counts == want.counts
    np.testing.assert_allclose(got.target_logprob, want.target_logprob, rtol=0, atol=TOL)
    np.testing.assert_allclose(got.topk_logprobs, want.topk_logprobs, rtol=0, atol=TOL)
    # Ids equal, except where two tokens' log-probs tie within the tolerance and swap places.
    same = got.topk_ids == want.topk_ids
    assert (same | (np.abs(got.topk_logprobs - want.topk_logprobs) <= TOL)).all()
    assert same.mean() > 0.99
    np.testing.assert_allclose(got.features, want.features, rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch_size", [4, 100])
def test_reused_signals_equal_the_plain_pass(pipeline, odd_examples, batch_size):
    model, tok, transform = load_for_inference(pipeline.teacher, device="cpu")
    n_img = num_image_tokens(model)
    groups_seen = 0
    for start in range(0, len(odd_examples), batch_size):  # batch edges split images' records
        chunk = odd_examples[start : start + batch_size]
        batch = collate(chunk, tok, transform, n_img, 256, tok.pad_token_id)
        groups_seen += len(plan_prefixes(batch, model.config.image_token_id).groups)
        _assert_close(_signals(model, batch, 8, True), _signals(model, batch, 8, False))
    assert groups_seen >= 4  # the reused path did run (and so did the plain one: C and D)


@pytest.mark.slow
def test_a_cache_built_with_reuse_matches_one_built_without(pipeline, tmp_path):
    cfg = CacheConfig(k=8, batch_size=5)
    reused, plain = (
        build_cache(pipeline.teacher, pipeline.shards, tmp_path / f"{r}.zarr", cfg_r, progress=False)
        for r, cfg_r in ((True, replace(cfg, prefix_reuse=True)), (False, replace(cfg, prefix_reuse=False)))
    )
    assert reused["fingerprint"] == plain["fingerprint"]  # same content: one fingerprint
    readers = [
        CacheReader(tmp_path / f"{r}.zarr", plain["fingerprint"], pipeline.manifest) for r in (True, False)
    ]
    keys = readers[1].root[pipeline.manifest["shards"][0]["name"]]["record_keys"][:].tolist()
    for got, want in zip(readers[0].tokens(keys), readers[1].tokens(keys), strict=True):
        # float16 values: the two passes may round across a float16 step (one ulp, <= 2^-10 relative)
        np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=2**-10, atol=TOL)
        np.testing.assert_allclose(got.target_logprob, want.target_logprob, rtol=0, atol=TOL)
        assert (got.ids == want.ids).mean() > 0.99
    images = sorted({k.split("#")[0] for k in keys})
    feats = [r.features(images).astype(np.float32) for r in readers]
    np.testing.assert_allclose(feats[0], feats[1], rtol=2**-10, atol=1e-5)

