"""The grounding diagnostics: patch labels, the linear probe, image reliance, and the command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from geodistill.bench.grounding import COLOURS, main, patch_labels, probe_accuracy, reliance
from geodistill.config import DataConfig, SyntheticConfig
from geodistill.data import synthetic
from geodistill.data.collate import iter_examples
from geodistill.data.prepare import prepare
from geodistill.data.shards import write_shards
from geodistill.data.template import SYSTEM
from geodistill.models.checkpoints import load_for_inference, save_llava
from geodistill.models.llava import build_llava
from geodistill.models.tokenizer import build_tokenizer
from geodistill.models.transform import ImageTransform


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_arch) -> tuple[Path, Path]:
    """(val-like shards of 6 synthetic training images, a random tiny model folder)."""
    root = tmp_path_factory.mktemp("grounding")
    synth = SyntheticConfig(
        image_size=32, grid=4, train_images=6, val_images=1, test_images=1, pretrain_texts=2
    )
    prepare(DataConfig(synthetic=synth), root / "prepared")
    lines = (root / "prepared" / "train.jsonl").read_text().splitlines()
    texts = [SYSTEM] + [t["value"] for line in lines for t in json.loads(line)["conversations"]]
    tok = build_tokenizer(texts, 400)
    arch = tiny_arch()
    save_llava(build_llava(arch, tok, seed=0), tok, ImageTransform(arch.image_size), root / "model")
    write_shards(
        root / "prepared" / "train.jsonl", root / "prepared", root / "shards", maxcount=4, maxsize=10**9
    )
    return root / "shards", root / "model"


def test_patch_labels_mark_each_objects_cells_with_its_colour():
    objects = (
        synthetic.SceneObject("ship", "red", "medium", 0, 1, 1, 2, 0),  # row 0, cols 1-2
        synthetic.SceneObject("storage tank", "white", "large", 2, 2, 2, 2, 0),  # rows 2-3, cols 2-3
    )
    scene = synthetic.Scene("x", "harbor", objects, b"", 32)
    lab = patch_labels(scene, 4).reshape(4, 4)
    red, white = COLOURS.index("red"), COLOURS.index("white")
    assert lab[0].tolist() == [0, red, red, 0]
    assert lab[2:, 2:].tolist() == [[white, white], [white, white]]
    assert int((lab == 0).sum()) == 16 - 2 - 4


def test_probe_reads_a_linear_signal_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()  # 4 classes, linear in two features
    assert probe_accuracy(x[:400], y[:400], x[400:], y[400:], 4) > 0.9
    noise = torch.randint(0, 4, (600,), generator=g)
    assert probe_accuracy(x[:400], noise[:400], x[400:], noise[400:], 4) < 0.45


def test_reliance_counts_position_tokens_and_an_image_blind_case(world):
    shards, model_dir = world
    model, tok, transform = load_for_inference(model_dir, device="cpu", dtype=torch.float32)[:3]
    referring = [ex for ex in iter_examples(shards) if ex.record.task == "referring"]
    assert referring, "the fixture's scenes have objects, so referring records"
    expected = sum(
        sum(ch.isdigit() for ch in piece) > 0
        for ex in referring
        for piece in tok.tokenize(" " + ex.record.conversations[-1].value)
    )
    r = reliance(model, tok, transform, referring, "position")
    assert r["tokens"] == expected > 0
    # One example per batch: rolling a batch of one keeps its image, so both readings are the same.
    same = reliance(model, tok, transform, referring, "position", batch_size=1)
    assert same["true_image"] == same["rolled_image"] == r["true_image"]


def test_command_writes_every_measure_per_model(world, tmp_path, capsys):
    shards, model_dir = world
    out = tmp_path / "grounding.json"
    main(
        [
            str(model_dir),
            "--shards",
            str(shards),
            "--records",
            "8",
            "--probe-images",
            "6",
            "4",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())[str(model_dir)]
    assert set(result["probes"]) == {
        "position_to_content_rms",
        "colour_probe",
        "colour_majority",
        "patch_probe",
        "patch_chance",
    }
    assert 0 < result["probes"]["position_to_content_rms"] < 1  # CLIP init: positions much weaker
    assert result["probes"]["patch_chance"] == 1 / 16
    assert set(result["reliance"]) <= {"referring", "grounding_description", "region_caption"}
    assert "referring" in result["reliance"]
    assert "patch index (probe)" in capsys.readouterr().out
