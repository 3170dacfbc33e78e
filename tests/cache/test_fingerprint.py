"""The cache fingerprint: one definition for builder, store and readers, every differing field named."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from geodistill.cache import fingerprint, store
from geodistill.cache.fingerprint import (
    cache_fingerprint,
    fingerprint_mismatch,
    make_fingerprint,
    teacher_max_len,
)
from geodistill.config import CacheConfig
from geodistill.distill import kd
from geodistill.errors import CacheError

FIELDS = {
    "teacher_sha256",
    "tokenizer_sha256",
    "manifest_sha256",
    "template",
    "vocab_size",
    "max_len",
    "k",
    "pooling",
    "encoding",
    "feature_encoding",
    "teacher_dtype",
}


def fields(**changes) -> dict:
    base = dict(
        teacher_sha256="t",
        tokenizer_sha256="tok",
        manifest_sha256="m",
        template="vicuna_v1",
        vocab_size=300,
        max_len=64,
        k=4,
        pooling=1,
        encoding="float16",
        teacher_dtype=torch.float32,
    )
    return make_fingerprint(**{**base, **changes})


def test_make_fingerprint_has_every_field_as_json():
    fp = fields(teacher_dtype=torch.bfloat16)
    assert set(fp) == FIELDS
    assert fp["teacher_dtype"] == "bfloat16" and fp["feature_encoding"] == CacheConfig.feature_encoding
    with pytest.raises(CacheError, match="unknown top-k encoding 'int4'"):
        fields(encoding="int4")
    with pytest.raises(CacheError, match="unknown feature encoding 'int4'"):
        fields(feature_encoding="int4")


def test_fingerprint_mismatch_lines():
    a = {"k": 16, "template": "vicuna_v1", "pooling": 1}
    b = {"k": 16, "template": "llama3", "extra": [1, 2]}
    assert fingerprint_mismatch(a, b) == [
        "extra: the cache has [1, 2], not expected at all",
        "pooling: missing in the cache, expected 1",
        "template: the cache has 'llama3', expected 'vicuna_v1'",
    ]
    assert fingerprint_mismatch(a, dict(a)) == []
    assert fingerprint_mismatch({"shape": (1, 2)}, {"shape": [1, 2]}) == []  # JSON view


def test_a_cache_of_another_teacher_dtype_is_refused(tmp_path: Path):
    """A bf16 teacher pass gives other numbers than a float32 one: the reader must not reuse them."""
    path, built_with = tmp_path / "c.zarr", fields()
    with store.CacheWriter(path, built_with).shard("s") as w:
        w.add_record("r", np.zeros((1, 4), np.int64), np.full((1, 4), -2.0, np.float32), np.zeros(1))
    manifest = {"shards": [{"name": "s", "records": 1, "samples": 0}]}
    store.CacheReader(path, built_with, manifest)  # the same fingerprint reads
    with pytest.raises(CacheError) as err:
        store.CacheReader(path, fields(teacher_dtype=torch.bfloat16, max_len=32), manifest)
    msg = str(err.value)
    assert "teacher_dtype: the cache has 'float32', expected 'bfloat16'" in msg
    assert "max_len: the cache has 64, expected 32" in msg


def test_cache_fingerprint_of_a_teacher_folder(pipeline):
    cfg = CacheConfig(k=8, encoding="uint8_log", pooling=2)
    fp = cache_fingerprint(pipeline.teacher, pipeline.manifest, cfg, len(pipeline.tok))
    assert set(fp) == FIELDS
    assert fp["max_len"] == pipeline.teacher_arch.max_position_embeddings == teacher_max_len(pipeline.teacher)
    assert (fp["k"], fp["encoding"], fp["pooling"]) == (8, "uint8_log", 2)
    assert fp["teacher_dtype"] == "float32" and fp["vocab_size"] == len(pipeline.tok)
    assert cache_fingerprint(pipeline.teacher, pipeline.manifest, cfg, len(pipeline.tok), 99)["max_len"] == 99


def test_teacher_max_len_names_the_file_it_could_not_read(tmp_path: Path):
    with pytest.raises(CacheError, match=r"config\.json: cannot read text_config\.max_position_embeddings"):
        teacher_max_len(tmp_path)


def _imported_modules(module) -> set[str]:
    tree = ast.parse(inspect.getsource(module))
    return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}


def test_readers_take_the_fingerprint_from_its_module_not_from_the_builder():
    for reader in (store, kd):
        assert "geodistill.cache.build" not in _imported_modules(reader), reader.__name__
    assert "geodistill.cache.fingerprint" in _imported_modules(kd)
    assert "config.json" not in inspect.getsource(kd)  # max_len comes from teacher_max_len
    assert "geodistill.cache.build" not in _imported_modules(fingerprint)
