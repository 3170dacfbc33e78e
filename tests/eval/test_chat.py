"""`geodistill chat` on a tiny saved model: answers, drawn boxes, adopted folders, clear errors, and the
same model and answer as `evaluate`."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from geodistill import cli
from geodistill.config import EvalConfig
from geodistill.data.records import Box
from geodistill.errors import GeodistillError
from geodistill.eval import chat as chat_mod
from geodistill.eval import run
from geodistill.eval.chat import boxes_path, chat, labelled_boxes, prepare_question
from geodistill.models.checkpoints import inference_dtype, load_for_inference, save_llava
from geodistill.models.llava import build_llava
from geodistill.models.tokenizer import build_tokenizer, image_token_id
from geodistill.models.transform import ImageTransform

CORPUS = [
    "The image shows a harbor area with 2 ships: <p>a red ship</p> {<8><82><16><90>|<69>}.",
    "[refer] <p>the white airplane</p> [grounding] [identify] What is in this image?",
    "A chat between a curious user and an artificial intelligence assistant. USER: ASSISTANT:",
] * 4

BOX_ANSWER = "<p>a red ship</p> {<10><10><50><40>|<30>}{<60><60><90><90>} and <p>a dock</p> {<0><0><20><20>}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_arch):
    tok = build_tokenizer(CORPUS, 300)
    path = tmp_path_factory.mktemp("chat") / "model"
    arch = tiny_arch()
    save_llava(build_llava(arch, tok, seed=0), tok, ImageTransform(arch.image_size), path)
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

    # An --out folder (named with a trailing slash: created) gets <image stem>_boxes.png.
    folder = tmp_path / "drawn"
    args = ["chat", "--model", str(model_dir), "--image", str(image), "--out", f"{folder}/", "ships"]
    assert cli.main(args) == 0
    assert (folder / "scene_boxes.png").is_file()
    assert f"boxes: 3 drawn on {folder / 'scene_boxes.png'}" in capsys.readouterr().out


def test_no_image_is_written_without_out(model_dir, image, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(chat_mod, "generate", lambda *a, **k: ([BOX_ANSWER], 0.0))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert cli.main(["chat", "--model", str(model_dir), "--image", str(image), "[grounding] ships"]) == 0
    printed = capsys.readouterr().out
    assert "boxes: 3 in the answer; pass --out" in printed  # says how to get the drawing
    assert list(work.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["scene.png", "work"]
    assert chat(model_dir, image, "ships").drawn is None


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
    assert boxes_path("a/b/img.jpg", tmp_path) == tmp_path / "img_boxes.png"  # an existing folder
    assert boxes_path("img.jpg", f"{tmp_path}/new/") == tmp_path / "new" / "img_boxes.png"
    assert boxes_path("img.jpg", tmp_path / "x.png") == tmp_path / "x.png"


def test_chat_and_evaluate_run_the_same_model(model_dir, image, tmp_path, monkeypatch):
    """Both load through load_for_inference (same device, same dtype): identical logits, and the chat
    answer is evaluate's prediction for the same question and image."""
    seen: dict[str, tuple[torch.dtype, torch.Tensor]] = {}

    def recording_loader(name):
        def load(model_path, **kwargs):
            model, tok, transform = load_for_inference(model_path, **kwargs)
            ids = torch.tensor([[tok.bos_token_id] + [image_token_id(tok)] * 16 + [5, 6, 7]])
            pixels = transform(Image.open(image)).unsqueeze(0)
            device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
            with torch.inference_mode():
                logits = model(input_ids=ids.to(device), pixel_values=pixels.to(device, dtype)).logits
            seen[name] = (dtype, logits.float().cpu())
            return model, tok, transform

        return load

    monkeypatch.setattr(chat_mod, "load_for_inference", recording_loader("chat"))
    monkeypatch.setattr(run, "load_for_inference", recording_loader("evaluate"))
    question = "<image>\nWhat is in this image?"
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": "ships"}]
    record = {"id": "q1", "image": image.name, "image_id": "scene", "task": "vqa", "conversations": turns,
              "meta": {"qtype": "presence"}}  # fmt: skip
    (prepared / "test.jsonl").write_text(json.dumps(record) + "\n")
    cfg = EvalConfig(batch_size=1, max_new_tokens=8, latency_samples=1)
    run.evaluate_model(model_dir, "tiny", cfg, prepared, image.parent, tmp_path / "plots")
    answer = chat(model_dir, image, question, max_new_tokens=8).answer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert seen["chat"][0] == seen["evaluate"][0] == inference_dtype(device)
    assert torch.equal(seen["chat"][1], seen["evaluate"][1])
    predictions = (tmp_path / "plots" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(p)["prediction"] for p in predictions] == [answer]
