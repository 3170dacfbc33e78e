"""The Zarr teacher cache: round trips, fingerprint refusal, resume of incomplete shards, manifest checks."""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from geodistill.cache import codec, feature_codec, store
from geodistill.cache.fingerprint import make_fingerprint
from geodistill.errors import CacheError

VOCAB = 300


def fingerprint(k: int = 4, encoding: str = "uint8_log", **changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = dict(
        teacher_sha256="teacher",
        tokenizer_sha256="tok",
        manifest_sha256="man",
        template="vicuna_v1",
        vocab_size=VOCAB,
        max_len=64,
        k=k,
        pooling=1,
        encoding=encoding,
        teacher_dtype=torch.float32,
    )
    return make_fingerprint(**{**fields, **changes})


def record(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One record's teacher top-k: ids (n, k), log-probs (n, k) float32, target log-probs (n,)."""
    logits = rng.normal(size=(n, VOCAB)) * rng.choice([0.3, 3.0])
    lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)  # (n, V)
    ids = np.argsort(-lp, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(lp, ids, axis=1).astype(np.float32)
    target = lp[np.arange(n), rng.integers(0, VOCAB, n)].astype(np.float32)
    return ids, top, target


Truth = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]


def build(
    path: Path,
    fp: dict[str, Any],
    layout: list[tuple[int, int]],
    *,
    seed: int = 0,
    max_tokens: int = 9,
    token_chunk: int = 4,
) -> tuple[dict[str, Any], Truth, dict[str, np.ndarray]]:
    """Write one shard per (records, images) in ``layout``; return the manifest and what was written."""
    rng = np.random.default_rng(seed)
    writer = store.CacheWriter(path, fp, token_chunk=token_chunk, feature_chunk_bytes=64)
    truth: Truth = {}
    images: dict[str, np.ndarray] = {}
    shards = []
    for s, (n_rec, n_img) in enumerate(layout):
        name = f"shard-{s:06d}.tar"
        with writer.shard(name) as w:
            for r in range(n_rec):
                key = f"s{s}-r{r}"
                truth[key] = record(rng, int(rng.integers(0, max_tokens + 1)), fp["k"])
                w.add_record(key, *truth[key])
            for i in range(n_img):
                images[f"s{s}-i{i}"] = rng.normal(size=(3, 5)).astype(np.float32)
                w.add_image(f"s{s}-i{i}", images[f"s{s}-i{i}"])
        shards.append({"name": name, "samples": n_img, "records": n_rec, "sha256": "x"})
    return {"shards": shards}, truth, images


def check_reads(
    reader: store.CacheReader,
    truth: Truth,
    images: dict[str, np.ndarray],
    encoding: str,
    feature_encoding: str = "float16",
) -> None:
    keys = list(truth)[::-1]  # any order, across shards
    for key, got in zip(keys, reader.tokens(keys), strict=True):
        ids, lp, target = truth[key]
        np.testing.assert_array_equal(got.ids, ids)
        assert got.ids.dtype == np.int64
        assert got.logprobs.dtype == np.float32 and got.logprobs.shape == lp.shape
        assert (np.abs(got.logprobs - lp) <= codec.error_bound(lp, encoding)).all()
        assert (np.exp(got.logprobs.astype(np.float64)).sum(axis=1) <= 1).all()
        np.testing.assert_array_equal(got.target_logprob, target)
    if images:
        ikeys = list(images)[::-1]
        feats = reader.features(ikeys)
        want = np.stack([images[k] for k in ikeys])
        assert feats.dtype == np.float32 and feats.shape == (len(ikeys), 3, 5)
        assert (np.abs(feats - want) <= feature_codec.feature_error_bound(want, feature_encoding)).all()


@settings(max_examples=15, deadline=None)
@given(
    layout=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 5)), min_size=1, max_size=3),
    k=st.integers(1, 7),
    encoding=st.sampled_from(codec.ENCODINGS),
    feature_encoding=st.sampled_from(feature_codec.FEATURE_ENCODINGS),
    token_chunk=st.integers(1, 8),
    seed=st.integers(0, 1000),
)
def test_write_read_roundtrip(
    layout: list[tuple[int, int]], k: int, encoding: str, feature_encoding: str, token_chunk: int, seed: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache.zarr"
        fp = fingerprint(k=k, encoding=encoding, feature_encoding=feature_encoding)
        manifest, truth, images = build(path, fp, layout, seed=seed, token_chunk=token_chunk)
        reader = store.CacheReader(path, fp, manifest, max_shards=1)  # LRU of one: shards get evicted
        check_reads(reader, truth, images, encoding, feature_encoding)
        assert reader.record_index() == {
            f"s{s}-r{r}": (f"shard-{s:06d}.tar", r) for s, (n, _) in enumerate(layout) for r in range(n)
        }


def test_layout_dtypes_and_attrs(tmp_path: Path) -> None:
    fp = fingerprint(k=4)
    build(tmp_path / "c.zarr", fp, [(3, 2)])
    root = store.open_cache(tmp_path / "c.zarr", fp, mode="r")
    assert root.attrs["format_version"] == store.FORMAT_VERSION and root.attrs["fingerprint"] == fp
    g = root["shard-000000.tar"]
    assert g["topk_ids"].dtype == np.uint16
    assert g["topk_head"].dtype == np.float16 and g["topk_gaps"].dtype == np.uint8
    assert g["target_logprob"].dtype == np.float32 and g["token_offsets"].dtype == np.int64
    assert g["features"].dtype == np.float16 and g["features"].shape == (2, 3, 5)
    assert "feature_scales" not in g
    assert g["record_keys"][:].tolist() == ["s0-r0", "s0-r1", "s0-r2"]
    n = int(g["token_offsets"][-1])
    assert {**g.attrs} == {
        "records": 3,
        "tokens": n,
        "images": 2,
        "k": 4,
        "encoding": "uint8_log",
        "feature_encoding": "float16",
        "complete": True,
    }


def test_int8_features_layout_and_error_bound(tmp_path: Path) -> None:
    """int8: one int8 per value plus one float32 scale per token; every value within scale / 2."""
    fp = fingerprint(k=4, feature_encoding="int8")
    manifest, _, images = build(tmp_path / "c.zarr", fp, [(2, 3), (1, 0)])
    g = store.open_cache(tmp_path / "c.zarr", fp, mode="r")["shard-000000.tar"]
    assert g["features"].dtype == np.int8 and g["features"].shape == (3, 3, 5)
    assert g["feature_scales"].dtype == np.float32 and g["feature_scales"].shape == (3, 3)
    empty = store.open_cache(tmp_path / "c.zarr", fp, mode="r")["shard-000001.tar"]
    assert empty["feature_scales"].shape == (0, 0)  # a shard without images has the arrays too
    reader = store.CacheReader(tmp_path / "c.zarr", fp, manifest)
    keys = list(images)
    got, want = reader.features(keys), np.stack([images[k] for k in keys])
    scale = np.abs(want).max(axis=-1, keepdims=True) / 127
    assert (np.abs(got - want) <= scale / 2 * (1 + 1e-5)).all()
    assert np.abs(got - want).max() > 0  # it is lossy: the test can fail
    with pytest.raises(CacheError) as err:  # another feature encoding is another cache
        store.CacheReader(tmp_path / "c.zarr", fingerprint(k=4, feature_encoding="float16"), manifest)
    assert "feature_encoding: the cache has 'int8', expected 'float16'" in str(err.value)


def test_rows_are_flushed_per_chunk_before_commit(tmp_path: Path) -> None:
    """A shard never has to sit in memory: full chunks reach disk while the writer is still open."""
    fp = fingerprint()
    writer = store.CacheWriter(tmp_path / "c.zarr", fp, token_chunk=8)
    w = writer.shard("s")
    rng = np.random.default_rng(0)
    for r in range(5):
        w.add_record(f"r{r}", *record(rng, 5, 4))  # 25 tokens
    assert w.group["topk_ids"].shape == (24, 4)  # three whole chunks written, one token buffered
    assert not writer.is_complete("s")
    assert w.commit()["tokens"] == 25
    assert w.group["topk_ids"].shape == (25, 4) and writer.is_complete("s")


def test_fingerprint_mismatch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    fp = fingerprint()
    manifest, _, _ = build(path, fp, [(2, 1)])
    other = fingerprint(k=8, teacher_sha256="another-teacher")
    for open_it in (
        lambda: store.CacheReader(path, other, manifest),
        lambda: store.CacheWriter(path, other),
        lambda: store.open_cache(path, other, mode="r"),
    ):
        with pytest.raises(CacheError) as err:
            open_it()
        msg = str(err.value)
        assert "k: the cache has 4, expected 8" in msg
        assert "teacher_sha256: the cache has 'teacher', expected 'another-teacher'" in msg
        assert "pooling" not in msg and "dvc repro teacher_cache" in msg
    # mode "w" is the explicit rebuild: it replaces the store.
    store.open_cache(path, other, mode="w")
    store.open_cache(path, other, mode="r")


def test_missing_cache(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match=r"no teacher cache.*dvc repro teacher_cache"):
        store.CacheReader(tmp_path / "nope.zarr", fingerprint(), {"shards": []})


def test_incomplete_shard_is_detected_and_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    fp = fingerprint()
    manifest, truth, images = build(path, fp, [(3, 2), (2, 1)])
    # A writer that dies mid-shard (an exception here; a kill leaves the same state): no `complete`.
    writer = store.CacheWriter(path, fp, token_chunk=4)
    rng = np.random.default_rng(5)
    with pytest.raises(RuntimeError), writer.shard("shard-000001.tar", overwrite=True) as w:
        w.add_record("s1-r0", *record(rng, 9, 4))
        raise RuntimeError("killed")
    assert not writer.is_complete("shard-000001.tar")
    assert writer.pending([s["name"] for s in manifest["shards"]]) == ["shard-000001.tar"]
    with pytest.raises(CacheError, match=r"shard 'shard-000001.tar': incomplete"):
        store.CacheReader(path, fp, manifest)
    # Resume: a new run keeps shard 0 and rebuilds shard 1 from scratch.
    writer = store.CacheWriter(path, fp, token_chunk=4)
    with writer.shard("shard-000001.tar") as w:
        for r in range(2):
            w.add_record(f"s1-r{r}", *truth[f"s1-r{r}"])
        w.add_image("s1-i0", images["s1-i0"])
    check_reads(store.CacheReader(path, fp, manifest), truth, images, "uint8_log")


def test_unreadable_group_metadata_counts_as_incomplete(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    fp = fingerprint()
    manifest, truth, images = build(path, fp, [(2, 1)])
    (path / "shard-000000.tar" / "zarr.json").write_text('{"truncated')  # killed mid-write
    writer = store.CacheWriter(path, fp)
    assert writer.pending(["shard-000000.tar"]) == ["shard-000000.tar"]
    with writer.shard("shard-000000.tar") as w:
        for key, rec in truth.items():
            w.add_record(key, *rec)
        w.add_image("s0-i0", images["s0-i0"])
    check_reads(store.CacheReader(path, fp, manifest), truth, images, "uint8_log")


def test_complete_shard_is_not_overwritten_by_accident(tmp_path: Path) -> None:
    fp = fingerprint()
    build(tmp_path / "c.zarr", fp, [(1, 1)])
    writer = store.CacheWriter(tmp_path / "c.zarr", fp)
    with pytest.raises(CacheError, match="already complete"):
        writer.shard("shard-000000.tar")
    writer.shard("shard-000000.tar", overwrite=True)
    assert not writer.is_complete("shard-000000.tar")


def test_counts_are_validated_against_the_manifest(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    fp = fingerprint()
    manifest, _, _ = build(path, fp, [(3, 2), (2, 1)])
    wrong = {
        "shards": [
            {**manifest["shards"][0], "records": 4},
            {**manifest["shards"][1], "samples": 3},
            {"name": "shard-000002.tar", "samples": 1, "records": 1},
        ]
    }
    with pytest.raises(CacheError) as err:
        store.CacheReader(path, fp, wrong)
    msg = str(err.value)
    assert "shard 'shard-000000.tar': 3 records, the manifest says 4" in msg
    assert "shard 'shard-000001.tar': 1 images, the manifest says 3" in msg
    assert "shard 'shard-000002.tar': missing" in msg


def test_bad_writes_are_refused(tmp_path: Path) -> None:
    fp = fingerprint()
    w = store.CacheWriter(tmp_path / "c.zarr", fp).shard("s")
    rng = np.random.default_rng(0)
    ids, lp, target = record(rng, 3, 4)
    w.add_record("a", ids, lp, target)
    with pytest.raises(CacheError, match="'a' added twice"):
        w.add_record("a", ids, lp, target)
    with pytest.raises(CacheError, match=r"record 'b'.*\(n, 4\)"):
        w.add_record("b", ids[:, :2], lp[:, :2], target)
    with pytest.raises(CacheError, match=r"record 'c'.*sorted in descending order"):
        w.add_record("c", ids, lp[:, ::-1].copy(), target)
    with pytest.raises(CacheError, match=r"record 'd'.*vocab_size"):
        w.add_record("d", ids + VOCAB, lp, target)
    w.add_image("i", np.zeros((3, 5)))
    with pytest.raises(CacheError, match=r"image 'j'.*\(3, 5\)"):
        w.add_image("j", np.zeros((3, 6)))
    w.commit()
    with pytest.raises(CacheError, match="already committed"):
        w.add_record("e", ids, lp, target)


def test_reader_unknown_keys_and_pickling(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr"
    fp = fingerprint()
    manifest, truth, images = build(path, fp, [(3, 2), (1, 1)])
    reader = store.CacheReader(path, fp, manifest, max_shards=None, max_feature_bytes=0)
    reader.preload()
    with pytest.raises(CacheError, match="record 'nope' is not in the teacher cache"):
        reader.tokens(["nope"])
    with pytest.raises(CacheError, match="image 'nope'"):
        reader.features(["nope"])
    clone = pickle.loads(pickle.dumps(reader))  # what a DataLoader worker receives
    check_reads(clone, truth, images, "uint8_log")  # features read per image from zarr (budget 0)
