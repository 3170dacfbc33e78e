from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from geodistill.bench.locate import LLM, READOUTS, Readout, main, referring_examples, scenes
from geodistill.models.tokenizer import build_tokenizer, save_tokenizer


def test_scenes_label_each_image_with_its_objects_cell():
    pixels, cells = scenes(5, "t", 32, 4)
    again, cells_again = scenes(5, "t", 32, 4)
    assert pixels.shape == (5, 3, 32, 32) and torch.equal(pixels, again) and torch.equal(cells, cells_again)
    assert ((cells >= 0) & (cells < 16)).all()


def test_referring_examples_ask_for_the_one_objects_box():
    _, cells = scenes(5, "t", 32, 4)
    for ex, cell in zip(referring_examples(5, "t", 32, 4), cells.tolist(), strict=True):
        assert ex.record.task == "referring"
        assert ex.record.first_question.startswith("<image>\n[refer] <p>the ")
        x1, y1 = (int(v) for v in re.findall(r"<(\d+)>", ex.record.answers[0])[:2])
        assert (y1 // 25, x1 // 25) == divmod(cell, 4)  # the box starts in the object's cell (25 units each)


@pytest.mark.parametrize("kind", READOUTS)
def test_each_readout_gives_cell_logits(kind):
    torch.manual_seed(0)
    tokens, cell = torch.randn(3, 16, 8), torch.tensor([0, 5, 15])
    out = Readout(kind, 8, 16)(tokens, cell)
    assert out.shape == (3, 16)
    perm = torch.randperm(16)
    if kind in ("attention", "mean"):  # a pool of the tokens: their order cannot matter
        readout = Readout(kind, 8, 16)
        torch.testing.assert_close(readout(tokens[:, perm], cell), readout(tokens, cell))
    if kind == "patch":  # one score per token: permuting the tokens permutes the logits
        readout = Readout(kind, 8, 16)
        torch.testing.assert_close(readout(tokens[:, perm], cell), readout(tokens, cell)[:, perm])
    if kind == "own_token":  # reads the given token only
        readout = Readout(kind, 8, 16)
        other = tokens.clone()
        other[:, 1] += 5.0  # token 1 is nobody's cell here
        torch.testing.assert_close(readout(other, cell), readout(tokens, cell))
    with pytest.raises(ValueError, match="unknown readout"):
        Readout("max", 8, 16)


def test_readout_init_depends_on_its_seed_only():
    torch.manual_seed(1)
    first = Readout("attention", 8, 16).state_dict()
    torch.manual_seed(2)  # another global RNG state: same weights
    second = Readout("attention", 8, 16).state_dict()
    for k in first:
        torch.testing.assert_close(first[k], second[k])
    assert not torch.equal(Readout("attention", 8, 16, seed=1).query, first["query"])


def test_command_trains_every_readout_and_scores_it(tmp_path: Path, tiny_arch, capsys):
    save_tokenizer(build_tokenizer(["a small red ship", "where is it?"], 300), tmp_path / "tok")
    arch = dataclasses.asdict(tiny_arch())
    train = {"steps": 4, "batch_size": 4, "lr": 0.01, "warmup": 1, "max_len": 256}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"teacher": {"arch": arch, "train": train}}))
    out = tmp_path / "locate.json"
    main(["--steps", "3", "--every", "2", "--batch-size", "4", "--images", "8", "4", "--positions", "sincos",
          "--readouts", ",".join((*READOUTS, LLM)),
          "--tokenizer", str(tmp_path / "tok"), "--params", str(tmp_path / "params.yaml"),
          "--out", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert result["settings"]["lr"] == 0.01 and result["settings"]["arch"]["vision_positions"] == "sincos"
    assert result["chance"] == 1 / 16
    expected = [(k, s) for k in (*READOUTS, LLM) for s in (2, 3)]
    assert [(r["readout"], r["step"]) for r in result["rows"]] == expected
    assert all(0 <= r["val_acc"] <= 1 and r["train_loss"] > 0 for r in result["rows"])
    assert "held-out accuracy %" in capsys.readouterr().out
