from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from geodistill.bench.learn import main, task_batches
from geodistill.config import DataConfig, SyntheticConfig
from geodistill.data.prepare import image_root, prepare, tokenizer_corpus
from geodistill.data.shards import write_shards
from geodistill.models.tokenizer import build_tokenizer, save_tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_arch) -> Path:
    """A pipeline-like folder: data/shards/{train,val}, models/tokenizer and a tiny params.yaml."""
    root = tmp_path_factory.mktemp("learn")
    synth = SyntheticConfig(
        image_size=32, grid=4, train_images=6, val_images=2, test_images=1, pretrain_texts=2
    )
    prepared = root / "data/prepared"
    prepare(DataConfig(synthetic=synth), prepared)
    for split in ("train", "val"):
        write_shards(prepared / f"{split}.jsonl", image_root(prepared), root / "data/shards" / split,
                     maxcount=4, maxsize=10**9)  # fmt: skip
    save_tokenizer(build_tokenizer(tokenizer_corpus(prepared), 400), root / "models/tokenizer")
    arch = dataclasses.asdict(tiny_arch())
    train = {"steps": 4, "batch_size": 4, "lr": 0.01, "warmup": 1, "max_len": 256}
    (root / "params.yaml").write_text(yaml.safe_dump({"teacher": {"arch": arch, "train": train}}))
    return root


def test_task_batches_hold_only_the_asked_tasks_and_repeat_exactly(world):
    shards = world / "data/shards/train"
    first = [next(it) for it in [task_batches(shards, {"referring"}, 4, seed=3)] for _ in range(3)]
    again = [next(it) for it in [task_batches(shards, {"referring"}, 4, seed=3)] for _ in range(3)]
    assert all(len(b) == 4 and {ex.record.task for ex in b} == {"referring"} for b in first)
    assert [[ex.record.id for ex in b] for b in first] == [[ex.record.id for ex in b] for b in again]


def test_command_scores_each_task_at_each_checkpoint(world, tmp_path, capsys):
    out = tmp_path / "learn.json"
    args = ["--tasks", "referring,region_caption", "--steps", "4", "--every", "2", "--records", "4",
            "--shards", str(world / "data/shards"), "--tokenizer", str(world / "models/tokenizer"),
            "--params", str(world / "params.yaml"), "--positions", "sincos",
            "--batch-size", "4", "--out", str(out)]  # fmt: skip
    main(args)
    result = json.loads(out.read_text())
    assert result["settings"]["arch"]["vision_positions"] == "sincos"
    assert result["settings"]["train"]["steps"] == 4
    got = [(r["step"], r["task"]) for r in result["rows"]]
    assert got == [(2, "referring"), (2, "region_caption"), (4, "referring"), (4, "region_caption")]
    for r in result["rows"]:
        assert r["tokens"] > 0 and 0 <= r["true_image"] <= 1 and 0 <= r["rolled_image"] <= 1
        assert r["train_loss"] > 0
    assert "rolled image %" in capsys.readouterr().out


def test_a_task_without_records_is_named(world, tmp_path):
    args = ["--tasks", "no_such_task", "--shards", str(world / "data/shards"),
            "--tokenizer", str(world / "models/tokenizer"), "--params", str(world / "params.yaml"),
            "--out", str(tmp_path / "x.json")]  # fmt: skip
    with pytest.raises(SystemExit, match="no_such_task"):
        main(args)
