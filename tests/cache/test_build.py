"""The teacher pass end to end on a tiny pipeline: cached values equal a direct teacher forward, rows align
with the student's tokenisation, a killed build resumes to the same content, 2 ranks build what 1 does,
and a store built for another fingerprint is refused."""

from __future__ import annotations

import functools
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr

from geodistill.bench import cache as bench_cache
from geodistill.cache import codec, feature_codec, store
from geodistill.cache.build import build_cache, build_shard, shard_batches, teacher_signals, topk_signals
from geodistill.cache.fingerprint import cache_fingerprint
from geodistill.cache.store import CacheReader, CacheWriter, TeacherTokens, record_key
from geodistill.config import CacheConfig
from geodistill.data.collate import IGNORE, Example, collate
from geodistill.data.shards import iter_shard, write_shards
from geodistill.distill.kd import gather_targets
from geodistill.distill.losses import distill_kl, reverse_kl
from geodistill.errors import CacheError, ConfigError, ShardError
from geodistill.models.checkpoints import load_for_inference
from geodistill.models.llava import build_llava, num_image_tokens, projector_features
from geodistill.models.transform import ImageTransform

BASE = CacheConfig(k=8, encoding="float16", pooling=1, batch_size=5)
"""5 records per forward: batches straddle images, mix lengths (padding) and end short at shard ends."""
NOISE = 2e-5
"""Float32 difference between a padded batch forward and a single-record forward, in nats (measured
<= 6e-6 here); added to the codec's rounding bound."""


@dataclass(frozen=True)
class Reference:
    """A record's teacher signals from its own, unbatched forward (no padding), in float64."""

    logprobs: np.ndarray  # (n, V) full log_softmax at the n supervised positions (t predicts token t+1)
    targets: np.ndarray  # (n,) the ground-truth token ids


@pytest.fixture(scope="module")
def examples(pipeline) -> dict[str, Example]:
    """Record key -> example, in shard order (the builder's order)."""
    out = {}
    for entry in pipeline.manifest["shards"]:
        for sample in iter_shard(pipeline.shards / entry["name"]):
            for i, rec in enumerate(sample.records):
                out[record_key(sample.key, i)] = Example(rec, sample.image_bytes, sample.key, i)
    return out


@pytest.fixture(scope="module")
def teacher(pipeline):
    model, _, transform = load_for_inference(pipeline.teacher, device="cpu")
    return model, transform


@pytest.fixture(scope="module")
def reference(pipeline, teacher, examples) -> dict[str, Reference]:
    model, transform = teacher
    n_img, max_len = num_image_tokens(model), pipeline.teacher_arch.max_position_embeddings
    refs = {}
    for key, ex in examples.items():
        batch = collate([ex], pipeline.tok, transform, n_img, max_len, pipeline.tok.pad_token_id)
        with torch.inference_mode():
            logits = model(input_ids=batch.input_ids, pixel_values=batch.pixel_values).logits[0, :-1]
        targets = batch.labels[0, 1:]  # (T-1,)
        sel = targets != IGNORE
        lp = torch.log_softmax(logits.double(), dim=-1)[sel]  # (n, V)
        refs[key] = Reference(lp.numpy(), targets[sel].numpy())
    return refs


@pytest.fixture(scope="module")
def image_features(pipeline, teacher, examples) -> dict[str, np.ndarray]:
    """Image key -> (P, D) raw projector outputs of that image alone."""
    model, transform = teacher
    out = {}
    for ex in examples.values():
        if ex.sample_key not in out:
            with torch.inference_mode():
                feats = projector_features(model, transform(ex.image())[None])[0]  # (P, D)
            out[ex.sample_key] = feats.numpy()
    return out


@pytest.fixture(scope="module")
def built(pipeline, tmp_path_factory) -> Callable[[CacheConfig], tuple[Path, dict[str, Any]]]:
    """CacheConfig -> (store path, build stats); every config is built once per module."""
    done: dict[CacheConfig, tuple[Path, dict[str, Any]]] = {}

    def get(cfg: CacheConfig) -> tuple[Path, dict[str, Any]]:
        if cfg not in done:
            out = tmp_path_factory.mktemp("cache") / "cache.zarr"
            done[cfg] = (out, build_cache(pipeline.teacher, pipeline.shards, out, cfg, progress=False))
        return done[cfg]

    return get


def reader_for(pipeline, built, cfg: CacheConfig) -> CacheReader:
    path, stats = built(cfg)
    return CacheReader(path, stats["fingerprint"], pipeline.manifest)


def topk(lp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, V) -> ids (n, k) and values (n, k), by descending value (ties: lower id first)."""
    ids = np.argsort(-lp, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(lp, ids, axis=1)


def assert_same_store(a: Path, b: Path) -> None:
    """Every attribute and every array of every group equal (values and dtypes)."""
    ra, rb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    assert dict(ra.attrs) == dict(rb.attrs)
    assert sorted(ra.group_keys()) == sorted(rb.group_keys())
    for name in ra.group_keys():
        ga, gb = ra[name], rb[name]
        assert dict(ga.attrs) == dict(gb.attrs), name
        assert sorted(ga.array_keys()) == sorted(gb.array_keys()), name
        for arr in ga.array_keys():
            x, y = ga[arr][:], gb[arr][:]
            assert x.dtype == y.dtype, (name, arr)
            np.testing.assert_array_equal(x, y, err_msg=f"{name}/{arr}")


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (inode, mtime_ns) of every file below ``folder``: unchanged iff not rewritten."""
    return {
        str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------ values and features


@pytest.mark.parametrize("encoding", codec.ENCODINGS)
def test_cached_signals_equal_a_direct_teacher_forward(pipeline, built, reference, examples, encoding):
    cfg = replace(BASE, encoding=encoding)
    _, stats = built(cfg)
    n_tokens = sum(len(r.targets) for r in reference.values())
    assert (stats["shards_built"], stats["shards_kept"]) == (len(pipeline.manifest["shards"]), 0)
    assert (stats["records"], stats["tokens"]) == (len(examples), n_tokens)
    reader = reader_for(pipeline, built, cfg)
    # Each group holds its shard's records, in the shard's order.
    for entry in pipeline.manifest["shards"]:
        keys = [
            record_key(s.key, i)
            for s in iter_shard(pipeline.shards / entry["name"])
            for i in range(len(s.records))
        ]
        assert reader.root[entry["name"]]["record_keys"][:].tolist() == keys

    keys = list(reference)
    for key, got in zip(keys, reader.tokens(keys), strict=True):
        ref = reference[key]
        ref_ids, ref_lp = topk(ref.logprobs, cfg.k)  # (n, k)
        assert got.ids.shape == got.logprobs.shape == (len(ref.targets), cfg.k)
        # Ids: exact, except that tokens whose log-probs tie within float noise may swap places.
        exact = got.ids == ref_ids
        swapped_ok = np.abs(np.take_along_axis(ref.logprobs, got.ids, 1) - ref_lp) <= NOISE
        assert (exact | swapped_ok).all(), key
        assert exact.mean() > 0.99
        # Log-probs within the encoding's documented bound (normalised over the full vocabulary).
        bound = codec.error_bound(ref_lp, encoding) + NOISE  # (n, k)
        assert (np.abs(got.logprobs - ref_lp) <= bound).all(), key
        # Tail bucket: 1 - sum(top-k), never negative, within the values' error.
        tail = codec.tail_mass(got.logprobs)  # (n,)
        ref_tail = 1.0 - np.exp(ref_lp).sum(1)
        assert (tail >= 0).all()
        assert (np.abs(tail - ref_tail) <= (np.exp(ref_lp) * 2 * bound).sum(1) + 1e-6).all(), key
        # The ground-truth token's exact log-prob (float32).
        want = ref.logprobs[np.arange(len(ref.targets)), ref.targets]
        np.testing.assert_allclose(got.target_logprob, want, rtol=1e-6, atol=NOISE)
    # The teacher is peaked, so the tail carries a real, not a degenerate, share of the mass.
    tails = np.concatenate([codec.tail_mass(t.logprobs) for t in reader.tokens(keys)])
    assert 0.01 < tails.mean() < 0.9


BF16_KL_BOUND = 1e-3
"""Largest mean KL (nats/token, k + 1 buckets) between a bf16 cache and the float32 teacher (measured on
this tiny teacher: 2.1e-4; see test_bf16_teacher_pass_stays_close_to_float32)."""


def test_bf16_teacher_pass_stays_close_to_float32(pipeline, built, reference):
    """cache.precision bf16 (weights and compute in bfloat16, on CPU): the fingerprint says so, and each
    cached token's distribution stays close to the float32 teacher's. Measured here (k = 8, V = 400, 16
    image tokens, peaked teacher): KL(p_fp32 || p_bf16) over the k + 1 buckets 2.1e-4 nats/token on
    average, 1.4e-3 at most; top-1 ids equal on 98.8 % of tokens (the rest are near-ties). Bounds: mean
    <= BF16_KL_BOUND = 1e-3, any token <= 1e-2, top-1 agreement >= 95 %."""
    cfg = replace(BASE, precision="bf16")
    _, stats = built(cfg)
    assert stats["fingerprint"]["teacher_dtype"] == "bfloat16"
    expected = cache_fingerprint(pipeline.teacher, pipeline.manifest, cfg, len(pipeline.tok))
    assert stats["fingerprint"] == expected
    keys = list(reference)
    got = reader_for(pipeline, built, cfg).tokens(keys)
    ref_lp = torch.from_numpy(np.concatenate([reference[k].logprobs for k in keys]))  # (N, V) float64
    ids = torch.from_numpy(np.concatenate([t.ids for t in got]))  # (N, k) bf16 top-k
    lps = torch.from_numpy(np.concatenate([t.logprobs for t in got])).double()  # (N, k)
    # KL(fp32 || bf16) on the bf16 cache's k + 1 buckets: reverse_kl(q = fp32 teacher, p = bf16 cache)
    kl = reverse_kl(ref_lp, ids, lps)  # (N,)
    top1 = (ids[:, 0] == ref_lp.argmax(-1)).double().mean()
    print(f"bf16 vs fp32: mean KL {kl.mean():.2e}, max {kl.max():.2e}, top-1 agreement {top1:.4f}")
    assert kl.mean() <= BF16_KL_BOUND and kl.max() <= 1e-2
    assert top1 >= 0.95


def test_fp16_teacher_pass_needs_a_gpu(pipeline, tmp_path):
    with pytest.raises(ConfigError, match=r"cache\.precision is fp16, which needs a CUDA GPU.*use bf16"):
        build_cache(pipeline.teacher, pipeline.shards, tmp_path / "c", replace(BASE, precision="fp16"))
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(("pooling", "feature_encoding"), [(1, "float16"), (2, "float16"), (2, "int8")])
def test_cached_features_equal_the_pooled_projector_outputs(
    pipeline, built, examples, image_features, pooling, feature_encoding
):
    cfg = replace(
        BASE, pooling=pooling, feature_encoding=feature_encoding, batch_size=BASE.batch_size + pooling - 1
    )
    reader = reader_for(pipeline, built, cfg)
    images = list(image_features)
    assert sorted(images) == sorted({ex.sample_key for ex in examples.values()})
    got = reader.features(images)  # (I, P', D) float32, decoded
    g = pipeline.teacher_arch.image_size // pipeline.teacher_arch.patch_size  # patch grid side
    d = pipeline.teacher_arch.hidden_size
    assert got.dtype == np.float32 and got.shape == (len(images), (g // pooling) ** 2, d)
    for image, feats in zip(images, got, strict=True):
        raw = image_features[image].reshape(g // pooling, pooling, g // pooling, pooling, d)
        want = raw.mean(axis=(1, 3)).reshape(-1, d)  # (P', D) average over each pooling x pooling block
        # the stored encoding's bound, plus float32 noise between the builder's pass and this one
        bound = feature_codec.feature_error_bound(want, feature_encoding) + 2e-5 * (1 + np.abs(want))
        assert (np.abs(feats - want) <= bound).all(), image


def test_topk_signals_rows_are_each_records_answer_tokens_in_order():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=gen) * 3  # (B, T, V)
    labels = torch.full((3, 6), IGNORE)
    labels[0, 2:4] = torch.tensor([5, 7])  # record 0: tokens 2, 3 (predicted at positions 1, 2)
    labels[2, 1:6] = torch.tensor([1, 2, 3, 4, 10])  # record 2: tokens 1-5; record 1 has no answer
    out = topk_signals(logits, labels, k=4)
    assert out.counts == [2, 0, 5]
    rows = [(0, 1), (0, 2), (2, 0), (2, 1), (2, 2), (2, 3), (2, 4)]  # (record, predicting position)
    lp = torch.log_softmax(logits.double(), dim=-1)
    want = torch.stack([lp[b, t] for b, t in rows])  # (N, V)
    np.testing.assert_allclose(out.topk_logprobs, want.topk(4).values.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out.topk_ids, want.topk(4).indices.numpy())
    targets = [int(labels[b, t + 1]) for b, t in rows]
    np.testing.assert_allclose(out.target_logprob, want[torch.arange(7), targets].numpy(), rtol=1e-6)
    assert [len(ids) for ids, _, _ in out.per_record()] == [2, 0, 5]


def test_overlapped_shard_loop_writes_the_same_content_and_propagates_errors(
    pipeline, built, teacher, tmp_path
):
    ref_path, stats = built(BASE)
    model, transform = teacher
    tok, n_img = pipeline.tok, num_image_tokens(model)
    max_len = pipeline.teacher_arch.max_position_embeddings
    signals = functools.partial(
        teacher_signals, model, k=BASE.k, pooling=BASE.pooling, prefix_reuse=BASE.prefix_reuse
    )

    def batches(name: str):
        collate_fn = functools.partial(
            collate,
            tok=tok,
            transform=transform,
            num_image_tokens=n_img,
            max_len=max_len,
            pad_id=tok.pad_token_id,
        )
        return shard_batches(pipeline.shards / name, BASE.batch_size, collate_fn)

    writer = CacheWriter(tmp_path / "cache.zarr", stats["fingerprint"])
    names = [s["name"] for s in pipeline.manifest["shards"]]
    for name in names:
        with writer.shard(name) as sw:
            build_shard(signals, batches(name), sw, overlap=True)
    assert_same_store(tmp_path / "cache.zarr", ref_path)

    def nan_targets(batch):  # the writer thread refuses these
        out = signals(batch)
        return replace(out, target_logprob=np.full_like(out.target_logprob, np.nan))

    def failing_reader():
        yield from itertools.islice(batches(names[0]), 2)
        raise ShardError("truncated tar")

    for fn, source, error in (
        (nan_targets, batches(names[0]), CacheError),
        (signals, failing_reader(), ShardError),
    ):
        with pytest.raises(error), writer.shard(names[0], overwrite=True) as sw:
            build_shard(fn, source, sw, overlap=True)
        assert not writer.is_complete(names[0])  # left for the next run to rebuild


# ------------------------------------------------------------------------------ student alignment


def test_cached_rows_align_with_the_student_tokenisation(pipeline, built, reference, examples):
    tok, arch = pipeline.tok, pipeline.student_arch
    student = build_llava(arch, tok, seed=1).eval()
    assert arch.hidden_size != pipeline.teacher_arch.hidden_size
    n_img, transform, pad = num_image_tokens(student), ImageTransform(arch.image_size), tok.pad_token_id
    reader = reader_for(pipeline, built, BASE)
    keys = list(examples)
    cached = dict(zip(keys, reader.tokens(keys), strict=True))
    for key in keys:  # one record at a time: supervised positions == cached rows
        batch = collate([examples[key]], tok, transform, n_img, arch.max_position_embeddings, pad)
        assert int(batch.target_mask[:, 1:].sum()) == len(cached[key].ids), key

    chosen = keys[::7]  # across images and shards
    exs = [examples[k] for k in chosen]
    for max_len in (arch.max_position_embeddings, 150):  # 150 cuts answers short
        batch = collate(exs, tok, transform, n_img, max_len, pad)
        targets = gather_targets(reader, exs, batch)
        counts = targets.kl_mask.sum(1).tolist()
        full = [len(cached[k].ids) for k in chosen]
        if max_len == 150:
            assert batch.truncated > 0 and any(0 < n < f for n, f in zip(counts, full, strict=True))
        else:
            assert counts == full
        # Row-major over the student's supervised positions: each record's first n cached rows.
        prefix = [(cached[k], n) for k, n in zip(chosen, counts, strict=True)]
        np.testing.assert_array_equal(
            targets.topk_ids.numpy(), np.concatenate([t.ids[:n] for t, n in prefix])
        )
        np.testing.assert_array_equal(
            targets.topk_logprobs.numpy(), np.concatenate([t.logprobs[:n] for t, n in prefix])
        )
        # The token the student predicts at each row is the teacher's target of that cached row.
        labels = batch.labels[:, 1:][targets.kl_mask].numpy()  # (M,)
        np.testing.assert_array_equal(
            labels, np.concatenate([reference[k].targets[:n] for k, n in zip(chosen, counts, strict=True)])
        )
        assert targets.features.shape == (len(exs), n_img, pipeline.teacher_arch.hidden_size)
        with torch.inference_mode():
            logits = student(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                pixel_values=batch.pixel_values,
            ).logits
        kl = distill_kl("reverse", logits[:, :-1], targets.topk_ids, targets.topk_logprobs, targets.kl_mask)
        assert torch.isfinite(kl) and kl > 0


def test_student_supervising_more_than_the_cache_is_stale(pipeline, built, examples):
    reader = reader_for(pipeline, built, BASE)
    key = next(k for k, ex in examples.items() if len(reader.tokens([k])[0].ids) > 1)

    class ShortReader:
        """The real cache, one row short for every record (as a cache from another template would be)."""

        def tokens(self, keys: list[str]) -> list[TeacherTokens]:
            return [
                TeacherTokens(t.ids[:-1], t.logprobs[:-1], t.target_logprob[:-1]) for t in reader.tokens(keys)
            ]

        def features(self, image_keys: list[str]) -> np.ndarray:
            return reader.features(image_keys)

    ex, arch = examples[key], pipeline.student_arch
    n_img, transform = arch.num_image_tokens, ImageTransform(arch.image_size)
    batch = collate(
        [ex], pipeline.tok, transform, n_img, arch.max_position_embeddings, pipeline.tok.pad_token_id
    )
    with pytest.raises(CacheError, match="stale"):
        gather_targets(ShortReader(), [ex], batch)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ resume


KILLED_BUILD = """
import functools, json, os, sys, threading
from pathlib import Path

import torch

torch.set_num_threads(1)
from geodistill.cache import build, store
from geodistill.config import CacheConfig

teacher, shards, out, marker = map(Path, sys.argv[1:5])
cfg = CacheConfig(**json.loads(sys.argv[5]))
# Tiny token chunks: the group being written when the process dies already has rows on disk.
build.CacheWriter = functools.partial(store.CacheWriter, token_chunk=4)
committed = []
commit, add_record = store.ShardWriter.commit, store.ShardWriter.add_record


def counting_commit(self):
    counts = commit(self)
    committed.append(self.group.basename)
    return counts


def add_record_then_hang(self, *args, **kwargs):
    add_record(self, *args, **kwargs)
    if committed and self._tokens_written > 0:  # one group complete, the next one half written
        marker.with_suffix(".tmp").write_text(self.group.basename)
        os.replace(marker.with_suffix(".tmp"), marker)
        threading.Event().wait()  # until the test's SIGKILL


store.ShardWriter.commit = counting_commit
store.ShardWriter.add_record = add_record_then_hang
build.build_cache(teacher, shards, out, cfg, progress=False)
"""


def test_resume_after_a_kill_keeps_complete_groups_and_matches_an_uninterrupted_build(
    pipeline, built, tmp_path
):
    ref_path, ref_stats = built(BASE)
    names = [s["name"] for s in pipeline.manifest["shards"]]
    out, marker, script = tmp_path / "cache.zarr", tmp_path / "hung", tmp_path / "killed_build.py"
    script.write_text(KILLED_BUILD)
    args = [pipeline.teacher, pipeline.shards, out, marker, json.dumps(asdict(BASE))]
    with (tmp_path / "stderr.txt").open("w") as err:
        proc = subprocess.Popen([sys.executable, str(script), *map(str, args)], stderr=err, env=_env())
        try:
            deadline = time.monotonic() + 120
            while not marker.exists():  # bounded poll for the hook, not a timing guess
                assert proc.poll() is None, f"build exited early:\n{(tmp_path / 'stderr.txt').read_text()}"
                assert time.monotonic() < deadline, "the build never reached its second shard"
                time.sleep(0.05)
        finally:
            proc.kill()  # SIGKILL: no cleanup, no commit
            proc.wait()
    assert marker.read_text() == names[1]
    root = zarr.open_group(out, mode="r")
    assert store.is_complete(root, names[0]) and not store.is_complete(root, names[1])
    assert any(p.is_file() for p in (out / names[1] / "topk_ids" / "c").rglob("*"))  # rows on disk
    assert not any((out / n).exists() for n in names[2:])
    with pytest.raises(CacheError, match="incomplete"):
        CacheReader(out, ref_stats["fingerprint"], pipeline.manifest)

    kept = snapshot(out / names[0])
    stats = build_cache(pipeline.teacher, pipeline.shards, out, BASE, progress=False)
    assert (stats["shards_kept"], stats["shards_built"]) == (1, len(names) - 1)
    assert stats["records"] == sum(s["records"] for s in pipeline.manifest["shards"][1:])
    assert snapshot(out / names[0]) == kept  # the complete group was not rewritten
    assert_same_store(out, ref_path)
    CacheReader(out, ref_stats["fingerprint"], pipeline.manifest)  # validates
    # A further run has nothing left to do.
    again = build_cache(pipeline.teacher, pipeline.shards, out, BASE, progress=False)
    assert (again["shards_kept"], again["shards_built"], again["tokens"]) == (len(names), 0, 0)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


# ------------------------------------------------------------------------------- two processes


DIST_BUILD = """
import json, sys
from pathlib import Path

import torch

torch.set_num_threads(1)
from geodistill.cache.build import build_cache
from geodistill.config import CacheConfig

teacher, shards, out = map(Path, sys.argv[1:4])
stats = build_cache(teacher, shards, out, CacheConfig(**json.loads(sys.argv[4])), progress=False)
stats.pop("fingerprint")
(out.parent / f"stats-{stats['rank']}.json").write_text(json.dumps(stats))
"""


@pytest.mark.slow
def test_two_process_build_equals_the_one_process_build(pipeline, built, tmp_path):
    ref_path, _ = built(BASE)
    script, out = tmp_path / "dist_build.py", tmp_path / "cache.zarr"
    script.write_text(DIST_BUILD)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
    ]
    cmd += [str(pipeline.teacher), str(pipeline.shards), str(out), json.dumps(asdict(BASE))]
    # Own session, so that a timeout takes the launcher's workers down with it.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True
    )
    try:
        _, stderr = proc.communicate(timeout=110)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    names = [s["name"] for s in pipeline.manifest["shards"]]
    for rank in (0, 1):
        stats = json.loads((tmp_path / f"stats-{rank}.json").read_text())
        mine = pipeline.manifest["shards"][rank::2]  # round-robin by shard
        assert stats["shards_built"] == len(mine) == len(names[rank::2])
        assert stats["records"] == sum(s["records"] for s in mine)
    assert_same_store(out, ref_path)


# ------------------------------------------------------------------------------------ refusal


def test_readers_expect_the_fingerprint_the_builder_wrote(pipeline, built):
    path, stats = built(BASE)
    expected = cache_fingerprint(pipeline.teacher, pipeline.manifest, BASE, len(pipeline.tok))
    assert stats["fingerprint"] == expected and expected["teacher_dtype"] == "float32"
    assert dict(zarr.open_group(path, mode="r").attrs)["fingerprint"] == expected


def test_a_store_for_another_fingerprint_is_refused(pipeline, built, tmp_path):
    path, stats = built(BASE)
    fp = stats["fingerprint"]
    for field, value in (("teacher_sha256", "0" * 64), ("k", 4), ("encoding", "uint8_log")):
        with pytest.raises(CacheError, match=rf"{field}: the cache has .*, expected {value!r}"):
            CacheReader(path, {**fp, field: value}, pipeline.manifest)

    before = snapshot(path)
    with pytest.raises(CacheError, match=r"k: the cache has 8, expected 4"):
        build_cache(pipeline.teacher, pipeline.shards, path, replace(BASE, k=4), progress=False)
    # Other shards of the same records (a re-shard) are other data as far as the cache can tell.
    reshard = tmp_path / "shards"
    write_shards(pipeline.prepared / "train.jsonl", pipeline.prepared, reshard, maxcount=4, maxsize=10**9)
    with pytest.raises(CacheError, match=r"manifest_sha256: the cache has"):
        build_cache(pipeline.teacher, reshard, path, BASE, progress=False)
    assert snapshot(path) == before  # refused before touching any group


# ----------------------------------------------------------------------------------- benchmark


def test_cache_benchmark_runs_on_the_tiny_teacher(pipeline, capsys, tmp_path):
    v = len(pipeline.tok)
    args = ["--model", str(pipeline.teacher), "--shards", str(pipeline.shards), "--k", "4", str(v)]
    args += ["--batch-size", "8", "--batches", "2", "--repeats", "1", "--throughput-k", "4"]
    bench_cache.main(args)
    out = capsys.readouterr().out
    assert "(a) bytes per cached token" in out and "bytes per image" in out
    assert "throughput ratio of build_cache on cpu" in out
    # At k = V the tail is empty: the bucket KL the losses see is the exact KL.
    row = next(line for line in out.splitlines() if line.startswith(f"| {v} | 0.0000 |"))
    assert row.rstrip(" |").endswith("1.000")
