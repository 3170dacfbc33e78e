"""Tiny teacher/student LLaVAs built from configs: forward, save/load, LoRA, freezing, features."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from geodistill.config import LlavaArch
from geodistill.errors import ModelError
from geodistill.models.factory import (
    ImageTransform,
    apply_lora,
    build_llava,
    capture_projector,
    check_compatible,
    count_parameters,
    freeze_vision_tower,
    load_llava,
    merge_lora,
    num_image_tokens,
    projector_features,
    save_llava,
    unwrap,
    weights_hash,
)
from geodistill.models.tokenizer import build_tokenizer, image_token_id, tokenizer_hash

CORPUS = [
    "The image shows a harbor area with 2 ships: <p>a red ship</p> {<8><82><16><90>|<69>}.",
    "[refer] <p>the white airplane</p>",
    "How many vehicles are there? Answer the question using a single word or phrase.",
    "A chat between a curious user and an artificial intelligence assistant. USER: ASSISTANT:",
] * 4

TEACHER = LlavaArch(
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
    max_position_embeddings=128,
)
STUDENT = LlavaArch(**{**TEACHER.__dict__, "hidden_size": 48, "intermediate_size": 96, "num_kv_heads": 2})


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(CORPUS, 300)


@pytest.fixture(scope="module")
def teacher(tok):
    return build_llava(TEACHER, tok, seed=0).eval()


def batch(tok, n_img: int, b: int = 2):
    """(B, T) ids: <s>, the image tokens, a short answer; and (B, 3, 32, 32) pixels."""
    text = tok.encode(" a red ship {<8><82><16><90>}", add_special_tokens=False)
    ids = torch.tensor([[tok.bos_token_id] + [image_token_id(tok)] * n_img + text] * b)
    pixels = torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return ids, pixels


def test_build_matches_tokenizer_and_arch(tok, teacher):
    cfg = teacher.config
    assert teacher.get_input_embeddings().num_embeddings == len(tok) == cfg.text_config.vocab_size
    assert cfg.image_token_id == image_token_id(tok)
    assert cfg.vision_feature_layer == -1 and cfg.vision_feature_select_strategy == "default"
    assert num_image_tokens(teacher) == TEACHER.num_image_tokens == 16
    assert cfg.text_config.pad_token_id == tok.pad_token_id


def test_seeded_build_is_deterministic_and_leaves_global_rng(tok, teacher):
    state = torch.random.get_rng_state()
    again = build_llava(TEACHER, tok, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert weights_hash(again) == weights_hash(teacher)
    assert weights_hash(build_llava(TEACHER, tok, seed=1)) != weights_hash(teacher)


def test_invalid_arch_is_refused(tok):
    bad = LlavaArch(**{**TEACHER.__dict__, "image_size": 30, "num_heads": 5})
    with pytest.raises(ModelError, match="image_size must be a multiple") as err:
        build_llava(bad, tok, seed=0)
    assert "num_heads" in str(err.value)  # every problem at once


def test_forward_with_image_tokens_and_projector_features(tok, teacher):
    ids, pixels = batch(tok, 16)
    with capture_projector(teacher) as cap:
        out = teacher(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids))
    assert out.logits.shape == (2, ids.shape[1], len(tok))
    assert torch.isfinite(out.logits).all()
    feats = projector_features(teacher, pixels)
    assert feats.shape == (2, 16, TEACHER.hidden_size)
    assert torch.allclose(cap.features, feats, atol=1e-6)  # same tensor, from the logits' own pass
    assert len(cap.outputs) == 1  # the vision tower ran once
    with pytest.raises(ModelError, match="no projector output"):
        with capture_projector(teacher) as empty:
            teacher(input_ids=ids[:, -3:])
        _ = empty.features


def test_captured_features_carry_gradients(tok):
    student = build_llava(STUDENT, tok, seed=0)
    ids, pixels = batch(tok, 16)
    with capture_projector(student) as cap:
        student(input_ids=ids, pixel_values=pixels)
    cap.features.pow(2).mean().backward()
    assert student.model.multi_modal_projector.linear_1.weight.grad is not None
    # vision_feature_layer=-1: the tower's last layer is trained too (with -2 it would get no gradient)
    assert student.model.vision_tower.encoder.layers[-1].mlp.fc2.weight.grad is not None


def test_save_load_round_trip(tok, teacher, tmp_path):
    ids, pixels = batch(tok, 16)
    transform = ImageTransform(32)
    save_llava(teacher, tok, transform, tmp_path / "ck")
    files = set(os.listdir(tmp_path / "ck"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= files
    model, tok2, transform2 = load_llava(tmp_path / "ck")
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


def test_generate_runs(tok, teacher):
    ids, pixels = batch(tok, 16, b=1)
    out = teacher.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)


def test_load_errors_say_what_to_do(tok, teacher, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_llava(tmp_path / "missing")
    geochat = tmp_path / "geochat"
    geochat.mkdir()
    (geochat / "config.json").write_text(json.dumps({"model_type": "geochat", "mm_vision_tower": "clip"}))
    with pytest.raises(ModelError, match=r"geodistill\.models\.convert"):
        load_llava(geochat)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelError, match="not 'llava'"):
        load_llava(llama)
    # A truncated checkpoint: transformers would initialise the missing weight at random.
    save_llava(teacher, tok, ImageTransform(32), tmp_path / "ck")
    weights = load_file(tmp_path / "ck" / "model.safetensors")
    del weights[next(k for k in weights if "layers.1.mlp.up_proj" in k)]
    save_file(weights, tmp_path / "ck" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="incomplete"):
        load_llava(tmp_path / "ck")
    # A tokenizer of another size next to the weights.
    save_llava(teacher, tok, ImageTransform(32), tmp_path / "ck")
    build_tokenizer(CORPUS, 260).save_pretrained(tmp_path / "ck")
    with pytest.raises(ModelError, match="vocabulary"):
        load_llava(tmp_path / "ck")


def test_image_token_count_mismatch_is_an_error(tok, teacher):
    ids, pixels = batch(tok, 15)
    with pytest.raises(Exception, match=r"(?i)image"):
        teacher(input_ids=ids, pixel_values=pixels)


def test_lora_touches_only_language_model_q_v(tok):
    model = build_llava(STUDENT, tok, seed=0)
    ids, pixels = batch(tok, 16)
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=pixels).logits
    wrapped = apply_lora(model, r=4, alpha=8, dropout=0.0)
    lora = [n for n, _ in wrapped.named_parameters() if "lora_" in n]
    assert lora and all("language_model" in n and ("q_proj" in n or "v_proj" in n) for n in lora)
    assert not any("vision_tower" in n for n in lora)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable == set(lora) | {n for n in trainable if "multi_modal_projector" in n}
    assert any("multi_modal_projector" in n for n in trainable)
    # Make the adapters non-trivial, then merging must preserve the function.
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        adapted = wrapped(input_ids=ids, pixel_values=pixels).logits
        assert not torch.allclose(adapted, before)
    with pytest.raises(ModelError, match="merge"):
        save_llava(wrapped, tok, ImageTransform(32), "/nonexistent/never-written")
    merged = merge_lora(wrapped)
    assert type(merged).__name__ == "LlavaForConditionalGeneration"
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids, pixel_values=pixels).logits, adapted, atol=1e-5)


def test_freeze_vision_tower_and_counts(tok):
    model = build_llava(STUDENT, tok, seed=0)
    counts = count_parameters(model)
    assert counts["total"] == counts["vision"] + counts["projector"] + counts["language_model"]
    assert counts["trainable"] == counts["total"]
    assert freeze_vision_tower(model) == counts["vision"]
    assert count_parameters(model)["trainable"] == counts["total"] - counts["vision"]
    ids, pixels = batch(tok, 16)
    model(input_ids=ids, pixel_values=pixels).logits.mean().backward()
    assert all(p.grad is None for p in model.model.vision_tower.parameters())
    assert model.lm_head.weight.grad is not None
    assert model.model.multi_modal_projector.linear_2.weight.grad is not None


def test_unwrap_sees_through_wrappers(tok):
    model = build_llava(STUDENT, tok, seed=0)
    holder = torch.nn.Module()
    holder.module = model  # DDP / DeepSpeed engines expose the model as .module
    assert unwrap(holder) is model
    with pytest.raises(ModelError, match="LlavaForConditionalGeneration"):
        unwrap(torch.nn.Linear(2, 2))


def test_check_compatible(tok):
    check_compatible(tok, build_tokenizer(CORPUS, 300))  # rebuilt identically: fine
    with pytest.raises(ModelError, match="vocabulary size"):
        check_compatible(tok, build_tokenizer(CORPUS, 260))
    # Same size, other merges: only the fingerprint tells them apart.
    a = build_tokenizer(CORPUS, 230)
    b = build_tokenizer(["zebra quartz jumping over lazy foxes, quickly and often"] * 8 + CORPUS, 230)
    assert len(a) == len(b)
    with pytest.raises(ModelError, match="hash"):
        check_compatible(a, b)


def test_image_transform(tmp_path):
    t = ImageTransform(32)
    wide = Image.new("RGB", (64, 40), (255, 0, 0))
    x = t(wide)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    # A flat colour stays flat, normalised channel by channel.
    expected = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(t.mean)) / torch.tensor(t.std)
    assert torch.allclose(x[:, 5, 5], expected, atol=1e-5)
    assert t.batch([wide, wide.convert("L")]).shape == (2, 3, 32, 32)
    # Padding to a square keeps the whole image: the mean-coloured border normalises to ~0.
    padded = ImageTransform(32, pad_to_square=True)(wide)
    assert padded[:, 0, 16].abs().max() < 0.02
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3})
    )
    loaded = ImageTransform.from_dir(tmp_path, 32)
    assert loaded.mean == (0.5, 0.5, 0.5) and loaded.std == (0.25, 0.25, 0.25)
    padded_t = ImageTransform(48, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), pad_to_square=True)
    padded_t.save(tmp_path)
    assert ImageTransform.from_dir(tmp_path, 48) == padded_t
    assert ImageTransform.from_dir(tmp_path / "none", 16) == ImageTransform(16)


def test_image_transform_matches_transformers_clip_processor(tmp_path):
    from transformers import AutoImageProcessor

    t = ImageTransform(32)
    t.save(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path, local_files_only=True)
    pixels = torch.randint(0, 256, (48, 64, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    image = Image.fromarray(pixels.numpy())
    expected = processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(t(image), expected, atol=1e-5)
