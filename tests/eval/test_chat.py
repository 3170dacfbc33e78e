"""`geodistill chat` on a tiny saved model: answers, drawn boxes, adopted folders, clear errors."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from geodistill import cli
from geodistill.config import LlavaArch
from geodistill.data.records import Box
from geodistill.errors import GeodistillError
from geodistill.eval import chat as chat_mod
from geodistill.eval.chat import boxes_path, chat, labelled_boxes, prepare_question
from geodistill.models.factory import ImageTransform, build_llava, save_llava
from geodistill.models.tokenizer import build_tokenizer

CORPUS = [
    "The image shows a harbor area with 2 ships: <p>a red ship</p> {<8><82><16><90>|<69>}.",
    "[refer] <p>the white airplane</p> [grounding] [identify] What is in this image?",
    "A chat between a curious user and an artificial intelligence assistant. USER: ASSISTANT:",
] * 4

ARCH = LlavaArch(
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    num_kv_heads=2,
    vision_hidden_size=32,
    vision_intermediate_size=64,
    vision_layers=3,
    vision_heads=2,
    image_size=32,
    patch_size=8,
    max_position_embeddings=512,
)
BOX_ANSWER = "<p>a red ship</p> {<10><10><50><40>|<30>}{<60><60><90><90>} and <p>a dock</p> {<0><0><20><20>}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = build_tokenizer(CORPUS, 300)
    path = tmp_path_factory.mktemp("chat") / "model"
    save_llava(build_llava(ARCH, tok, seed=0), tok, ImageTransform(ARCH.image_size), path)
    return path


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "scene.png"
    Image.new("RGB", (48, 40), (30, 60, 120)).save(path)
    return path


def test_cli_answers_one_question(model_dir, image, capsys):
    args = ["chat", "--model", str(model_dir), "--image", str(image), "--max-new-tokens", "4", "What is it?"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    expected = chat(model_dir, image, "What is it?", max_new_tokens=4)  # greedy: the same answer again
    assert printed == expected.answer + "\n"  # 4 tokens cannot hold a box, so nothing else is printed
    assert expected.max_new_tokens == 4


def test_boxes_in_the_answer_are_drawn(model_dir, image, tmp_path, monkeypatch, capsys):
    seen = []

    def fake_generate(model, tok, transform, n_img, prompts, *, batch_size, max_new_tokens, progress=None):
        seen.extend(prompts)
        return [BOX_ANSWER] * len(prompts), 0.0

    monkeypatch.setattr(chat_mod, "generate", fake_generate)
    out = tmp_path / "drawn.png"
    question = "[refer] <p>the red ship</p>"
    rc = cli.main(["chat", "--model", str(model_dir), "--image", str(image), "--out", str(out), question])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == BOX_ANSWER
    assert f"boxes: 3 drawn on {out}" in printed
    assert seen[0].turns[0].value == "<image>\n" + question  # the image placeholder was added
    with Image.open(out) as im:
        assert im.format == "PNG" and min(im.size) >= chat_mod.MIN_DRAW_SIDE  # small images are enlarged
        colours = {c for _, c in im.convert("RGB").getcolors(maxcolors=1 << 16)}
    assert (30, 60, 120) in colours and len(colours) > 2  # the scene plus coloured outlines

    # Default path: <image stem>_boxes.png in the current folder.
    monkeypatch.chdir(tmp_path)
    assert cli.main(["chat", "--model", str(model_dir), "--image", str(image), "[grounding] ships"]) == 0
    assert (tmp_path / "scene_boxes.png").is_file()


def test_adopted_pointer_is_followed(model_dir, image, tmp_path, monkeypatch):
    monkeypatch.setattr(chat_mod, "generate", lambda *a, **k: (["no boxes here"], 0.0))
    adopted = tmp_path / "models" / "teacher"
    adopted.mkdir(parents=True)
    (adopted / "adopted.json").write_text(json.dumps({"path": str(model_dir)}))
    res = chat(adopted, image, "<image>\nWhat is it?")
    assert res.answer == "no boxes here" and res.boxes == () and res.drawn is None


def test_errors_exit_2_with_a_message(model_dir, image, tmp_path, capsys):
    cases = [
        (["--model", str(model_dir), "--image", str(tmp_path / "none.png")], "image file not found"),
        (["--model", str(tmp_path / "nowhere"), "--image", str(image)], "no such model folder"),
        (["--model", str(tmp_path), "--image", str(image)], "not a Hugging Face checkpoint"),
        (["--model", str(model_dir), "--image", str(model_dir / "config.json")], "not a readable image"),
        (["--model", str(model_dir), "--image", str(image), "--max-new-tokens", "0"], "max-new-tokens"),
    ]
    for args, message in cases:
        assert cli.main(["chat", *args, "What is it?"]) == 2, message
        assert message in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adopted.json").write_text("{")
    assert cli.main(["chat", "--model", str(broken), "--image", str(image), "hi"]) == 2
    assert "adopted-model pointer" in capsys.readouterr().err


def test_question_and_box_helpers(tmp_path):
    assert prepare_question("  hi ") == "<image>\nhi"
    assert prepare_question("[refer] <image> x") == "[refer] <image> x"
    with pytest.raises(GeodistillError, match="empty"):
        prepare_question(" ")
    with pytest.raises(GeodistillError, match="2 <image>"):
        prepare_question("<image><image>")
    assert labelled_boxes(BOX_ANSWER) == [
        ("a red ship", Box(10, 10, 50, 40, 30)),
        ("a red ship", Box(60, 60, 90, 90)),
        ("a dock", Box(0, 0, 20, 20)),
    ]
    assert labelled_boxes("{<1><2><3><4>}")[0][0] is None
    assert boxes_path("a/b/img.jpg", None).name == "img_boxes.png"
    assert boxes_path("img.jpg", tmp_path) == tmp_path / "img_boxes.png"
    assert boxes_path("img.jpg", tmp_path / "x.png") == tmp_path / "x.png"
