"""Shared evaluation fixtures: one METEOR JVM (~7 s to start) for every test that scores captions, and
the tiny world (a prepared synthetic split + random tiny models) that evaluate and the demo run on."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from geodistill.config import DataConfig, LlavaArch, SyntheticConfig
from geodistill.data.prepare import prepare
from geodistill.data.template import SYSTEM
from geodistill.errors import GeodistillError
from geodistill.eval.meteor import MeteorScorer
from geodistill.models.checkpoints import save_llava
from geodistill.models.llava import build_llava
from geodistill.models.tokenizer import build_tokenizer
from geodistill.models.transform import ImageTransform

World = Callable[[Path, int, Sequence[tuple[str, LlavaArch]]], tuple[Path, dict[str, Path]]]


def _build_world(
    root: Path, image_size: int, models: Sequence[tuple[str, LlavaArch]]
) -> tuple[Path, dict[str, Path]]:
    """3 synthetic test images prepared under ``root/prepared`` and one random model per (name, arch)
    (seeded by its position), saved under ``root/<name>``; returns (prepared, {name: model folder})."""
    prepared = root / "prepared"
    synthetic = SyntheticConfig(image_size=image_size, grid=4, train_images=1, val_images=1, test_images=3,
                                pretrain_texts=2)  # fmt: skip
    prepare(DataConfig(synthetic=synthetic), prepared)
    texts = [SYSTEM]
    for split in ("train", "test"):
        for line in (prepared / f"{split}.jsonl").read_text().splitlines():
            texts += [t["value"] for t in json.loads(line)["conversations"]]
    tok = build_tokenizer(texts, 400)
    folders = {}
    for seed, (name, arch) in enumerate(models):
        save_llava(build_llava(arch, tok, seed=seed), tok, ImageTransform(arch.image_size), root / name)
        folders[name] = root / name
    return prepared, folders


@pytest.fixture(scope="session")
def make_world() -> World:
    """The tiny-world builder (a function, so module-scoped fixtures choose their sizes and models)."""
    return _build_world


@pytest.fixture(scope="session")
def meteor():
    """A running scorer; its teardown checks that close() ends the JVM and that a closed scorer refuses."""
    m = MeteorScorer(timeout_s=600)  # only a guard against a hung JVM: start-up is slow on busy cores
    yield m
    proc = m._m.meteor_p
    m.close()
    assert proc.poll() is not None, "the METEOR JVM outlived close()"
    m.close()  # idempotent
    with pytest.raises(GeodistillError, match="closed"):
        m.score(["a"], [["a"]])
