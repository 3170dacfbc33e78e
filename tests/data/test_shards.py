import json
from pathlib import Path

import pytest

from geodistill.config import DataConfig, SyntheticConfig
from geodistill.data.prepare import prepare
from geodistill.data.shards import (
    iter_samples,
    load_manifest,
    read_jsonl_records,
    shards_for_rank,
    write_shards,
)
from geodistill.errors import DataError, ShardError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    cfg = DataConfig(
        synthetic=SyntheticConfig(train_images=23, val_images=3, test_images=3, pretrain_texts=5)
    )
    prepare(cfg, out)
    return out


def test_round_trip_records_and_image_bytes(prepared, tmp_path):
    m = write_shards(prepared / "train.jsonl", prepared, tmp_path, maxcount=5, maxsize=10**9)
    assert len(m["shards"]) == 5 and m["totals"]["samples"] == 23
    back = list(iter_samples(tmp_path))
    records = [r for s in back for r in s.records]
    assert records == list(read_jsonl_records(prepared / "train.jsonl"))
    assert m["totals"]["records"] == len(records)
    for s in back:
        assert s.image_bytes == (prepared / s.records[0].image).read_bytes()
        assert s.image().size == (s.width, s.height) == (64, 64)
        assert {r.image_id for r in s.records} == {s.image_id}


def test_deterministic_bytes(prepared, tmp_path):
    a = write_shards(prepared / "train.jsonl", prepared, tmp_path / "a", maxcount=8, maxsize=10**9)
    b = write_shards(prepared / "train.jsonl", prepared, tmp_path / "b", maxcount=8, maxsize=10**9)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_maxsize_rolls_over(prepared, tmp_path):
    m = write_shards(prepared / "train.jsonl", prepared, tmp_path, maxcount=1000, maxsize=20_000)
    assert len(m["shards"]) > 1
    assert all(s["bytes"] < 20_000 + 30_000 for s in m["shards"])


def test_rank_and_worker_split_partition_the_data(prepared, tmp_path):
    write_shards(prepared / "train.jsonl", prepared, tmp_path, maxcount=3, maxsize=10**9)
    everything = [s.key for s in iter_samples(tmp_path)]
    parts = []
    for rank in range(2):
        for worker in range(2):
            parts += [
                s.key for s in iter_samples(tmp_path, rank=rank, world_size=2, worker=worker, num_workers=2)
            ]
    assert sorted(parts) == sorted(everything) and len(parts) == len(set(parts))
    m = load_manifest(tmp_path)
    assert shards_for_rank(m, 0, 2) + shards_for_rank(m, 1, 2) != [] and len(shards_for_rank(m, 1, 2)) == 4


def test_manifest_detects_modified_and_missing_shards(prepared, tmp_path):
    m = write_shards(prepared / "train.jsonl", prepared, tmp_path, maxcount=10, maxsize=10**9)
    first = tmp_path / m["shards"][0]["name"]
    first.write_bytes(first.read_bytes()[:-512])
    with pytest.raises(ShardError, match="modified or truncated"):
        load_manifest(tmp_path)
    first.unlink()
    with pytest.raises(ShardError, match="missing"):
        load_manifest(tmp_path)


def test_manifest_counts_checked_while_streaming(prepared, tmp_path):
    write_shards(prepared / "train.jsonl", prepared, tmp_path, maxcount=10, maxsize=10**9)
    man = json.loads((tmp_path / "manifest.json").read_text())
    man["shards"][0]["records"] += 1
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ShardError, match="manifest says"):
        list(iter_samples(tmp_path, verify=False))


def test_ungrouped_input_is_an_error(prepared, tmp_path):
    lines = (prepared / "train.jsonl").read_text().splitlines()
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join([*lines, lines[0].replace('"id": "', '"id": "again-')]) + "\n")
    with pytest.raises(DataError, match="appears again"):
        write_shards(src, prepared, tmp_path / "out", maxcount=10, maxsize=10**9)


def test_missing_image_names_record_and_field(prepared, tmp_path):
    with pytest.raises(DataError, match=r"field 'image'"):
        write_shards(prepared / "train.jsonl", tmp_path, tmp_path / "out", maxcount=10, maxsize=10**9)
