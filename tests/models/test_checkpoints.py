"""Checkpoint I/O: save/load round trips, the two loaders and their dtype policy, adopted pointers, errors."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from geodistill.errors import ModelError
from geodistill.models.checkpoints import (
    adopt,
    check_checkpoint,
    inference_dtype,
    load_for_inference,
    load_for_training,
    model_fingerprint,
    resolve,
    save_llava,
    weights_hash,
)
from geodistill.models.llava import build_llava
from geodistill.models.tokenizer import build_tokenizer, image_token_id, tokenizer_hash
from geodistill.models.transform import ImageTransform

CORPUS = [
    "The image shows a harbor area with 2 ships: <p>a red ship</p> {<8><82><16><90>|<69>}.",
    "[refer] <p>the white airplane</p>",
    "A chat between a curious user and an artificial intelligence assistant. USER: ASSISTANT:",
] * 4
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(CORPUS, 300)


@pytest.fixture(scope="module")
def teacher(tok, tiny_arch):
    return build_llava(tiny_arch(), tok, seed=0).eval()


@pytest.fixture(scope="module")
def saved(teacher, tok, tmp_path_factory):
    """A float32 checkpoint of ``teacher``."""
    path = tmp_path_factory.mktemp("saved") / "ck"
    save_llava(teacher, tok, ImageTransform(32), path)
    return path


def inputs(tok, b: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids with the 16 image tokens of the tiny tower, and (B, 3, 32, 32) pixels."""
    text = tok.encode(" a red ship {<8><82><16><90>}", add_special_tokens=False)
    ids = torch.tensor([[tok.bos_token_id] + [image_token_id(tok)] * 16 + text] * b)
    return ids, torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_save_load_round_trip(tok, teacher, tmp_path):
    ids, pixels = inputs(tok)
    transform = ImageTransform(32)
    save_llava(teacher, tok, transform, tmp_path / "ck")
    files = set(os.listdir(tmp_path / "ck"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= files
    model, tok2, transform2 = load_for_inference(tmp_path / "ck", device=CPU)
    assert transform2 == transform
    assert tokenizer_hash(tok2) == tokenizer_hash(tok)
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids, pixel_values=pixels).logits,
            teacher(input_ids=ids, pixel_values=pixels).logits,
        )
    assert weights_hash(model) == weights_hash(teacher)
    # Overwriting is atomic (no temporary folders left) and byte-deterministic.
    first = weights_hash(tmp_path / "ck")
    save_llava(model, tok2, transform2, tmp_path / "ck")
    assert weights_hash(tmp_path / "ck") == first
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_inference_dtype_policy(monkeypatch):
    assert inference_dtype(CPU) == torch.float32
    assert inference_dtype(torch.device("meta")) == torch.float32  # any non-CUDA device
    native = {"bf16": True}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native["bf16"])
    assert inference_dtype(torch.device("cuda")) == torch.bfloat16
    assert inference_dtype(torch.device("cuda", 1)) == torch.bfloat16
    native["bf16"] = False  # pre-Ampere GPUs: bf16 only emulated
    assert inference_dtype(torch.device("cuda")) == torch.float16


def test_loaders_follow_the_policy_not_the_checkpoint_dtype(tok, tiny_arch, tmp_path):
    half = tmp_path / "half"
    save_llava(build_llava(tiny_arch(), tok, seed=0).to(torch.float16), tok, ImageTransform(32), half)
    assert json.loads((half / "config.json").read_text())["dtype"] == "float16"
    model, _, _ = load_for_inference(half, device="cpu")
    assert all(p.dtype == inference_dtype(CPU) == torch.float32 for p in model.parameters())
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert {p.device for p in model.parameters()} == {CPU}
    trainable, _, _ = load_for_training(half)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in trainable.parameters())
    assert {p.device for p in trainable.parameters()} == {CPU}


def test_folder_fingerprint_is_one_running_sha256(saved, tmp_path):
    """The folder hash streams name + bytes of every file into one sha256: values recorded in adopted.json
    files and cache roots by earlier versions stay valid."""
    h = hashlib.sha256()
    for f in sorted(saved.glob("*.safetensors")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    assert weights_hash(saved) == h.hexdigest()
    with pytest.raises(ModelError, match=r"no \*\.safetensors"):
        weights_hash(tmp_path)


def test_adopted_pointer(saved, tmp_path):
    out = tmp_path / "models" / "teacher"
    info = adopt(saved, out)
    assert resolve(out) == saved.resolve() and resolve(saved) == saved
    assert model_fingerprint(out) == {k: info[k] for k in ("weights_sha256", "tokenizer_sha256")}
    model, _, _ = load_for_training(out)
    assert weights_hash(model) == weights_hash(load_for_training(saved)[0])
    broken = tmp_path / "broken"
    broken.mkdir()
    for text in ("{", "[]", '{"weights_sha256": "x"}'):
        (broken / "adopted.json").write_text(text)
        with pytest.raises(ModelError, match="not a valid adopted-model pointer"):
            resolve(broken)
    (broken / "adopted.json").write_text(json.dumps({**info, "weights_sha256": "0" * 64}))
    with pytest.raises(ModelError, match="changed since it was adopted"):
        model_fingerprint(broken)


def test_load_errors_say_what_to_do(tok, teacher, tmp_path):
    with pytest.raises(ModelError, match="no such model folder"):
        load_for_inference(tmp_path / "missing")
    with pytest.raises(ModelError, match="does not exist"):
        check_checkpoint(tmp_path / "missing")
    geochat = tmp_path / "geochat"
    geochat.mkdir()
    (geochat / "config.json").write_text(json.dumps({"model_type": "geochat", "mm_vision_tower": "clip"}))
    with pytest.raises(ModelError, match=r"geodistill\.models\.convert"):
        load_for_inference(geochat)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelError, match="not 'llava'"):
        load_for_training(llama)
    # A truncated checkpoint: transformers would initialise the missing weight at random.
    save_llava(teacher, tok, ImageTransform(32), tmp_path / "ck")
    weights = load_file(tmp_path / "ck" / "model.safetensors")
    del weights[next(k for k in weights if "layers.1.mlp.up_proj" in k)]
    save_file(weights, tmp_path / "ck" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="incomplete"):
        load_for_inference(tmp_path / "ck")
    # A tokenizer of another size next to the weights.
    save_llava(teacher, tok, ImageTransform(32), tmp_path / "ck")
    build_tokenizer(CORPUS, 260).save_pretrained(tmp_path / "ck")
    with pytest.raises(ModelError, match="vocabulary"):
        load_for_training(tmp_path / "ck")
