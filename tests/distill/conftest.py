"""Tiny end-to-end fixtures for the distillation tests: data, tokenizer, teacher, student, teacher cache.

One session-scoped workspace laid out like the pipeline's (``data/prepared``, ``data/shards/{train,val}``,
``models/{teacher,student_sft}``, ``data/teacher_cache.zarr``), built in ~3 s: 12 synthetic 32 px scenes
(88 training records), a 400-token BPE, a TINY_ARCH teacher and a 32-wide student (16 image tokens).
Every path a training run writes to is passed in (``run_paths``): no test changes the working folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from geodistill.cache.build import build_cache
from geodistill.config import CacheConfig, DataConfig, LlavaArch, SyntheticConfig
from geodistill.data.prepare import image_root, prepare, tokenizer_corpus
from geodistill.data.shards import write_shards
from geodistill.distill.sft import RunPaths
from geodistill.models.checkpoints import save_llava, write_fingerprint
from geodistill.models.llava import build_llava
from geodistill.models.tokenizer import build_tokenizer
from geodistill.models.transform import ImageTransform

CACHE = CacheConfig(k=8, encoding="float16", pooling=1, batch_size=16)
TEACHER_SHARPNESS = 20.0
"""The random teacher's lm_head is scaled by this: a near-uniform teacher (max prob ~ 1/V) would make
KL values nearly position-independent, so a misaligned cache could pass an alignment test."""


@dataclass(frozen=True)
class Workspace:
    root: Path
    prepared: Path  # data/prepared
    shards: Path  # data/shards (train/, val/)
    teacher: Path  # models/teacher
    student: Path  # models/student_sft
    cache: Path  # data/teacher_cache.zarr, built with CACHE
    cache_cfg: CacheConfig


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_arch: Callable[..., LlavaArch]) -> Workspace:
    root = tmp_path_factory.mktemp("workspace")
    prepared, shards = root / "data/prepared", root / "data/shards"
    data = DataConfig(
        synthetic=SyntheticConfig(
            image_size=32, grid=4, train_images=12, val_images=3, test_images=1, pretrain_texts=20
        )
    )
    prepare(data, prepared)
    for split in ("train", "val"):
        # 5 images per shard: 3 training shards, so rank splits and multi-shard cache reads are exercised
        write_shards(
            prepared / f"{split}.jsonl", image_root(prepared), shards / split, maxcount=5, maxsize=10**9
        )
    tok = build_tokenizer(tokenizer_corpus(prepared), 400)
    teacher_arch = tiny_arch()
    transform = ImageTransform(teacher_arch.image_size)
    teacher = build_llava(teacher_arch, tok, seed=0)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(TEACHER_SHARPNESS)
    student_arch = tiny_arch(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=2)
    student = build_llava(student_arch, tok, seed=1)
    ws = Workspace(
        root,
        prepared,
        shards,
        root / "models/teacher",
        root / "models/student_sft",
        root / "data/teacher_cache.zarr",
        CACHE,
    )
    for model, out in ((teacher, ws.teacher), (student, ws.student)):
        save_llava(model, tok, transform, out)
        write_fingerprint(out)
    build_cache(ws.teacher, shards / "train", ws.cache, CACHE, progress=False)
    return ws


@pytest.fixture
def run_paths(tmp_path: Path) -> RunPaths:
    """Where one training run writes (model, dvclive folder, checkpoints), inside the test's folder."""
    return RunPaths(tmp_path / "model", tmp_path / "dvclive", tmp_path / "checkpoints")
