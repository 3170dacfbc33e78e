"""Shared test setup: one CPU thread (2-core machines collapse under OpenMP contention), no network,
and the one tiny LLaVA architecture every model test starts from."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import dataclasses
from collections.abc import Callable

import pytest
import torch
from hypothesis import settings

from geodistill.config import LlavaArch

torch.set_num_threads(1)

# Property tests draw a fixed set of examples, so a CI run is reproducible and a red one can be rerun as is;
# HYPOTHESIS_PROFILE=explore searches fresh (and more) examples on each run.
settings.register_profile("repro", derandomize=True)
settings.register_profile("explore", derandomize=False, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repro"))

TINY_ARCH = LlavaArch(
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
    vision_hidden_size=32,
    vision_intermediate_size=64,
    vision_layers=3,
    vision_heads=4,
    image_size=32,
    patch_size=8,
    max_position_embeddings=512,
)
"""A 2-layer, 64-wide LLM on a 3-layer 32-wide CLIP tower at 32 px (16 image tokens): builds in ms."""


SLOWEST_FIRST = ("test_full_pipeline_and_experiment_reuse", "test_commands_end_to_end_with_dvc_queue")
"""Collected first so that, under `--dist worksteal`, the longest test starts at once and the other worker
runs the rest meanwhile (the pipeline test is ~1/2 of the slow suite's single-worker time)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def tiny_arch() -> Callable[..., LlavaArch]:
    """``tiny_arch(**overrides)``: TINY_ARCH with some fields changed (e.g. a narrower student)."""

    def make(**overrides: object) -> LlavaArch:
        return dataclasses.replace(TINY_ARCH, **overrides)

    return make
