"""A tiny teacher-cache pipeline built in a temporary folder: prepared data, >= 3 shards, a tokenizer and
a saved, fingerprinted teacher, shared by the builder tests (built once per session, ~2 s)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from geodistill.config import DataConfig, LlavaArch, SyntheticConfig
from geodistill.data.prepare import prepare
from geodistill.data.shards import load_manifest, write_shards
from geodistill.data.template import SYSTEM
from geodistill.models.checkpoints import save_llava, write_fingerprint
from geodistill.models.llava import build_llava
from geodistill.models.tokenizer import build_tokenizer
from geodistill.models.transform import ImageTransform

LOGIT_SCALE = 25.0
"""The teacher's lm_head is scaled up so its next-token distributions are peaked like a trained model's
(a fresh init is near-uniform over the vocabulary: no meaningful top-k, tail mass ~1, near-ties)."""


@dataclass(frozen=True)
class TinyPipeline:
    root: Path
    prepared: Path
    shards: Path
    """10 images, 3 per shard: 4 shards of ~76 records in all."""
    teacher: Path
    """A saved LLaVA of ``teacher_arch`` with ``fingerprint.json`` (what the teacher stage leaves)."""
    tok: PreTrainedTokenizerFast
    manifest: dict[str, Any]
    teacher_arch: LlavaArch
    """The tiny architecture: 16 image tokens per image (a 4 x 4 patch grid, so pooling 2 and 4 apply)."""
    student_arch: LlavaArch
    """Another width, the same tokenizer and image tokens."""


def corpus(prepared: Path) -> list[str]:
    """Tokenizer training text: the template and every turn of the training records."""
    texts = [f"{SYSTEM} USER: ASSISTANT:"]
    with (prepared / "train.jsonl").open() as f:
        for line in f:
            texts += [t["value"].replace("<image>", "") for t in json.loads(line)["conversations"]]
    return texts


def make_pipeline(root: Path, teacher_arch: LlavaArch, student_arch: LlavaArch) -> TinyPipeline:
    data = DataConfig(
        synthetic=SyntheticConfig(
            image_size=32, grid=4, train_images=10, val_images=1, test_images=1, pretrain_texts=2
        )
    )
    prepared, shards, teacher = root / "prepared", root / "shards", root / "teacher"
    prepare(data, prepared)
    manifest = write_shards(prepared / "train.jsonl", prepared, shards, maxcount=3, maxsize=10**9)
    assert len(manifest["shards"]) >= 3
    tok = build_tokenizer(corpus(prepared), 400)
    model = build_llava(teacher_arch, tok, seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(LOGIT_SCALE)
    save_llava(model, tok, ImageTransform(teacher_arch.image_size), teacher)
    write_fingerprint(teacher)
    manifest = load_manifest(shards)
    return TinyPipeline(root, prepared, shards, teacher, tok, manifest, teacher_arch, student_arch)


@pytest.fixture(scope="session")
def pipeline(
    tmp_path_factory: pytest.TempPathFactory, tiny_arch: Callable[..., LlavaArch]
) -> TinyPipeline:
    # Two heads (32-wide heads) and a 256-token context: what this pipeline's teacher was tuned with.
    teacher = tiny_arch(num_heads=2, num_kv_heads=2, vision_heads=2, max_position_embeddings=256)
    student = dataclasses.replace(teacher, hidden_size=32, intermediate_size=64)
    return make_pipeline(tmp_path_factory.mktemp("pipeline"), teacher, student)
