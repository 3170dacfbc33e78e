import json

import pytest
from PIL import Image

from geodistill.config import DataConfig, GeoChatSourceConfig, SyntheticConfig
from geodistill.data.prepare import image_root, prepare, read_pretrain
from geodistill.errors import DataError


def _geochat(tmp_path, records):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for name in ("a.png", "b.jpg"):
        Image.new("RGB", (20, 10), (1, 2, 3)).save(img_dir / name)
    (img_dir / "broken.png").write_bytes(b"not an image")
    # A truncated PNG: its header reads, its pixels do not (only a full decode finds it).
    Image.effect_noise((64, 64), 50).convert("RGB").save(img_dir / "truncated.png")
    data = (img_dir / "truncated.png").read_bytes()
    (img_dir / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (20, 10)).save(tmp_path / "outside.png")
    (img_dir / "link.png").symlink_to(tmp_path / "outside.png")
    src = tmp_path / "geochat.json"
    src.write_text(json.dumps(records))
    return DataConfig(
        source="geochat", geochat=GeoChatSourceConfig(train_json=str(src), image_dir=str(img_dir))
    )


def rec(i, image="a.png", answer="{<1><2><30><40>|<10>}", q="<image>\n[refer] <p>ship</p>"):
    return {
        "id": f"r{i}",
        "image": image,
        "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": answer}],
    }


def test_synthetic_prepare_is_deterministic(tmp_path):
    cfg = DataConfig(synthetic=SyntheticConfig(train_images=5, val_images=2, test_images=2, pretrain_texts=3))
    r1 = prepare(cfg, tmp_path / "a")
    prepare(cfg, tmp_path / "b")
    for f in ("train.jsonl", "val.jsonl", "test.jsonl", "pretrain.jsonl", "images/train000003.png"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert r1["skipped"] == 0 and set(r1["records"]["test"]) == {
        "scene",
        "vqa",
        "referring",
        "region_caption",
    }
    assert len(read_pretrain(tmp_path / "a")) == 3
    assert image_root(tmp_path / "a") == tmp_path / "a" / "."


def test_train_val_test_images_are_disjoint(tmp_path):
    cfg = DataConfig(synthetic=SyntheticConfig(train_images=5, val_images=2, test_images=2, pretrain_texts=1))
    prepare(cfg, tmp_path)
    ids = {
        s: {json.loads(line)["image_id"] for line in (tmp_path / f"{s}.jsonl").open()}
        for s in ("train", "val", "test")
    }
    assert (
        not (ids["train"] & ids["test"])
        and not (ids["train"] & ids["val"])
        and not (ids["val"] & ids["test"])
    )


BAD = [
    (rec(1, image="missing.png"), "not found"),
    (rec(2, image="broken.png"), "unreadable"),
    (rec(8, image="truncated.png"), "unreadable"),
    (rec(9, image="../outside.png"), "field 'image': image path '../outside.png' resolves outside"),
    (rec(10, image="/etc/hostname"), "resolves outside the image folder"),
    (rec(11, image="link.png"), "field 'image': image path 'link.png' resolves outside"),
    (rec(3, answer="{<1><2><300><40>}"), "outside the 0-100 grid"),
    (rec(4, answer=""), "empty answer"),
    (
        {"id": "r5", "image": "a.png", "conversations": [{"from": "bot", "value": "<image>\nx"}]},
        "unknown role",
    ),
    ({"id": "r6", "conversations": []}, "field 'image'"),
]


@pytest.mark.parametrize(("bad", "why"), BAD)
def test_geochat_bad_record_raises_with_file_record_field(tmp_path, bad, why):
    cfg = _geochat(tmp_path, [rec(0), bad])
    with pytest.raises(DataError) as e:
        prepare(cfg, tmp_path / "out")
    assert why in str(e.value) and bad["id"] in str(e.value) and "geochat.json" in str(e.value)


def test_geochat_skip_policy_counts_every_skip(tmp_path):
    cfg = _geochat(tmp_path, [rec(0), rec(7, image="b.jpg")] + [b for b, _ in BAD])
    cfg = DataConfig(source="geochat", on_error="skip", geochat=cfg.geochat)
    report = prepare(cfg, tmp_path / "out")
    assert report["skipped"] == len(BAD)
    assert sorted(s["record"] for s in report["skips"]) == sorted(b["id"] for b, _ in BAD)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["skipped"] == len(BAD)
    n = sum(1 for split in ("train", "val") for _ in (tmp_path / "out" / f"{split}.jsonl").open())
    assert n == 2
    assert image_root(tmp_path / "out") == tmp_path / "imgs"


def test_geochat_invalid_json(tmp_path):
    cfg = _geochat(tmp_path, [])
    (tmp_path / "geochat.json").write_text("[{oops")
    with pytest.raises(DataError, match="invalid JSON at line 1"):
        prepare(cfg, tmp_path / "out")
