"""The teacher cache's fingerprint: everything the cached numbers depend on (docs/design.md, "Teacher cache").

One definition for every party: the builder (``cache.build``) writes it into the store's root attrs,
the store (``cache.store``) refuses a cache whose fingerprint differs from the expected one, naming
every differing field, and the readers (``distill.kd``, the benchmarks) compute the expected one here.

Fields: ``teacher_sha256``, ``tokenizer_sha256`` (the teacher folder's recorded fingerprint),
``manifest_sha256`` (the shard contents), ``template``, ``vocab_size``, ``max_len`` (the longest
tokenised record, the teacher's context length), ``k``, ``pooling``, ``encoding`` (``CacheConfig``),
``feature_encoding`` (how projector features are stored: ``cache.feature_codec``) and ``teacher_dtype``
(the dtype of the teacher pass, ``cache.precision``: a bf16 pass gives other log-probs than a float32 one).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from geodistill.cache import codec, feature_codec
from geodistill.config import CacheConfig, Encoding, FeatureEncoding
from geodistill.data.shards import manifest_hash
from geodistill.data.template import TEMPLATE_NAME
from geodistill.errors import CacheError
from geodistill.models.checkpoints import PRECISIONS, model_fingerprint, resolve

LAYOUT_FIELDS = ("vocab_size", "k", "encoding", "feature_encoding")
"""Fields the store itself needs: they fix the arrays' shapes and dtypes."""


def make_fingerprint(
    *,
    teacher_sha256: str,
    tokenizer_sha256: str,
    manifest_sha256: str,
    template: str,
    vocab_size: int,
    max_len: int,
    k: int,
    pooling: int,
    encoding: Encoding,
    teacher_dtype: torch.dtype,
    feature_encoding: FeatureEncoding = CacheConfig.feature_encoding,
) -> dict[str, Any]:
    """The fingerprint from its fields, as it reads back from the store's JSON attrs."""
    codec.check_encoding(encoding)
    feature_codec.check_feature_encoding(feature_encoding)
    return jsonable(
        {
            "teacher_sha256": teacher_sha256,
            "tokenizer_sha256": tokenizer_sha256,
            "manifest_sha256": manifest_sha256,
            "template": template,
            "vocab_size": int(vocab_size),
            "max_len": int(max_len),
            "k": int(k),
            "pooling": int(pooling),
            "encoding": encoding,
            "feature_encoding": feature_encoding,
            "teacher_dtype": str(teacher_dtype).removeprefix("torch."),
        }
    )


def teacher_max_len(teacher_dir: Path) -> int:
    """The teacher's context length (from its config.json, no weights loaded): the builder's max_len."""
    config = resolve(teacher_dir) / "config.json"
    try:
        return int(json.loads(config.read_text())["text_config"]["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CacheError(
            f"{config}: cannot read text_config.max_position_embeddings ({e!r}); is {teacher_dir} a LLaVA "
            "checkpoint folder?"
        ) from e


def cache_fingerprint(
    teacher_dir: Path,
    manifest: Mapping[str, Any],
    cfg: CacheConfig,
    vocab_size: int,
    max_len: int | None = None,
) -> dict[str, Any]:
    """The fingerprint of the cache of ``teacher_dir`` over the shards of ``manifest`` with ``cfg``
    (``cfg.precision`` gives the teacher dtype).

    ``vocab_size``: the teacher tokenizer's length; ``max_len``: default the teacher's context length
    (what ``build_cache`` truncates records to).
    """
    fp = model_fingerprint(teacher_dir)
    return make_fingerprint(
        teacher_sha256=fp["weights_sha256"],
        tokenizer_sha256=fp["tokenizer_sha256"],
        manifest_sha256=manifest_hash(dict(manifest)),
        template=TEMPLATE_NAME,
        vocab_size=vocab_size,
        max_len=teacher_max_len(teacher_dir) if max_len is None else max_len,
        k=cfg.k,
        pooling=cfg.pooling,
        encoding=cfg.encoding,
        teacher_dtype=PRECISIONS[cfg.precision],
        feature_encoding=cfg.feature_encoding,
    )


def scratch_fingerprint(
    vocab_size: int,
    k: int,
    encoding: Encoding,
    pooling: int = 1,
    feature_encoding: FeatureEncoding = CacheConfig.feature_encoding,
) -> dict[str, Any]:
    """A fingerprint with placeholder hashes, for a store one process writes and reads (benchmarks)."""
    return make_fingerprint(
        teacher_sha256="scratch",
        tokenizer_sha256="scratch",
        manifest_sha256="scratch",
        template=TEMPLATE_NAME,
        vocab_size=vocab_size,
        max_len=0,
        k=k,
        pooling=pooling,
        encoding=encoding,
        teacher_dtype=PRECISIONS[CacheConfig().precision],
        feature_encoding=feature_encoding,
    )


def jsonable(fp: Mapping[str, Any]) -> dict[str, Any]:
    """What a fingerprint looks like after a trip through zarr.json (tuples become lists, ...)."""
    try:
        return json.loads(json.dumps(dict(fp), sort_keys=True))
    except TypeError as e:
        raise CacheError(f"the cache fingerprint must be JSON-serialisable: {e}") from e


def fingerprint_mismatch(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """One readable line per field that differs between two fingerprints (empty when they agree)."""
    exp, got = jsonable(expected), jsonable(found)
    lines = []
    for key in sorted(exp.keys() | got.keys()):
        if key not in got:
            lines.append(f"{key}: missing in the cache, expected {exp[key]!r}")
        elif key not in exp:
            lines.append(f"{key}: the cache has {got[key]!r}, not expected at all")
        elif exp[key] != got[key]:
            lines.append(f"{key}: the cache has {got[key]!r}, expected {exp[key]!r}")
    return lines


def check_layout_fields(fp: Mapping[str, Any]) -> None:
    """The fields the store's arrays depend on are there and valid."""
    missing = [f for f in LAYOUT_FIELDS if f not in fp]
    if missing:
        raise CacheError(f"the cache fingerprint lacks {', '.join(missing)} (use make_fingerprint)")
    codec.check_encoding(fp["encoding"])
    feature_codec.check_feature_encoding(fp["feature_encoding"])
    if int(fp["k"]) < 1:
        raise CacheError(f"fingerprint k must be >= 1, got {fp['k']}")
    codec.id_dtype(int(fp["vocab_size"]))
