"""Tiny teacher/student LLaVAs built from configs: forward, projector features, LoRA, freezing, wrappers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from geodistill.config import LoraConfig
from geodistill.errors import ModelError
from geodistill.models.checkpoints import save_llava, weights_hash
from geodistill.models.llava import (
    ATTENTION,
    apply_lora,
    build_llava,
    capture_projector,
    count_parameters,
    enable_checkpointing,
    freeze_vision_tower,
    merge_lora,
    num_image_tokens,
    projector_features,
    sincos_2d,
    unwrap,
    vision_embeddings,
)
from geodistill.models.tokenizer import build_tokenizer, image_token_id
from geodistill.models.transform import ImageTransform

CORPUS = [
    "The image shows a harbor area with 2 ships: <p>a red ship</p> {<8><82><16><90>|<69>}.",
    "[refer] <p>the white airplane</p>",
    "How many vehicles are there? Answer the question using a single word or phrase.",
    "A chat between a curious user and an artificial intelligence assistant. USER: ASSISTANT:",
] * 4


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(CORPUS, 300)


@pytest.fixture(scope="module")
def arch(tiny_arch):
    return tiny_arch()


@pytest.fixture(scope="module")
def student_arch(tiny_arch):
    return tiny_arch(hidden_size=48, intermediate_size=96, num_kv_heads=2)


@pytest.fixture(scope="module")
def teacher(tok, arch):
    return build_llava(arch, tok, seed=0).eval()


def batch(tok, n_img: int, b: int = 2):
    """(B, T) ids: <s>, the image tokens, a short answer; and (B, 3, 32, 32) pixels."""
    text = tok.encode(" a red ship {<8><82><16><90>}", add_special_tokens=False)
    ids = torch.tensor([[tok.bos_token_id] + [image_token_id(tok)] * n_img + text] * b)
    pixels = torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return ids, pixels


def test_build_matches_tokenizer_and_arch(tok, teacher, arch):
    cfg = teacher.config
    assert teacher.get_input_embeddings().num_embeddings == len(tok) == cfg.text_config.vocab_size
    assert cfg.image_token_id == image_token_id(tok)
    assert cfg.vision_feature_layer == -1 and cfg.vision_feature_select_strategy == "default"
    assert num_image_tokens(teacher) == arch.num_image_tokens == 16
    assert cfg.text_config.pad_token_id == tok.pad_token_id


def test_seeded_build_is_deterministic_and_leaves_global_rng(tok, teacher, arch):
    state = torch.random.get_rng_state()
    again = build_llava(arch, tok, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert weights_hash(again) == weights_hash(teacher)
    assert weights_hash(build_llava(arch, tok, seed=1)) != weights_hash(teacher)


def test_sincos_table_separates_every_patch_position():
    table = sincos_2d(4, 64)  # (16, 64)
    assert table.shape == (16, 64)
    assert torch.allclose(table.mean(dim=0), torch.zeros(64), atol=1e-6)  # no constant offset
    # Row-major patch order: rows 0 and 1 are horizontal neighbours, rows 0 and 4 vertical ones.
    dist = torch.cdist(table, table) + torch.eye(16) * 1e9
    assert dist.min() > 0.1
    assert torch.allclose(torch.dist(table[0], table[1]), torch.dist(table[0], table[4]))
    with pytest.raises(ModelError, match="divisible by 4"):
        sincos_2d(4, 30)


def test_sincos_positions_make_a_built_tower_know_where_its_patches_are(tok, teacher, arch):
    sincos = build_llava(dataclasses.replace(arch, vision_positions="sincos"), tok, seed=0)
    emb = vision_embeddings(sincos)
    positions = emb.position_embedding.weight.detach()[1:]  # CLS row excluded
    expected = sincos_2d(arch.image_size // arch.patch_size, positions.shape[1])
    cosine = torch.nn.functional.cosine_similarity(positions.flatten(), expected.flatten(), dim=0)
    assert cosine > 0.9999
    # As strong as a patch's content; CLIP's own init (the default) is ~25x weaker.
    pixels = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    content = emb.patch_embedding(pixels).flatten(2).transpose(1, 2).pow(2).mean().sqrt()
    assert 0.5 < positions.pow(2).mean().sqrt() / content < 2.0
    clip = vision_embeddings(teacher).position_embedding.weight.detach()[1:]
    assert clip.pow(2).mean().sqrt() < content / 10
    # Everything else is the same seeded init.
    for (name, a), (_, b) in zip(sincos.named_parameters(), teacher.named_parameters(), strict=True):
        assert torch.equal(a, b) or "vision_tower.embeddings.position_embedding" in name, name


def test_init_std_sets_the_language_model_and_projector_init_only(tok, teacher, arch):
    wide = build_llava(dataclasses.replace(arch, init_std=0.1), tok, seed=0)
    for name in (
        "model.language_model.layers.0.self_attn.q_proj.weight",
        "lm_head.weight",
        "model.language_model.embed_tokens.weight",
        "model.multi_modal_projector.linear_1.weight",
    ):
        w, w0 = wide.get_parameter(name), teacher.get_parameter(name)
        assert abs(w.std().item() - 0.1) < 0.01, name
        assert abs(w0.std().item() - 0.02) < 0.002, name  # Llama's default
    tower = "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(wide.get_parameter(tower), teacher.get_parameter(tower))


def test_invalid_arch_is_refused(tok, tiny_arch):
    bad = tiny_arch(image_size=30, num_heads=5, init_std=0.0)
    with pytest.raises(ModelError, match="image_size must be a multiple") as err:
        build_llava(bad, tok, seed=0)
    assert "num_heads" in str(err.value) and "init_std" in str(err.value)  # every problem at once


def test_forward_with_image_tokens_and_projector_features(tok, teacher, arch):
    ids, pixels = batch(tok, 16)
    with capture_projector(teacher) as cap:
        out = teacher(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids))
    assert out.logits.shape == (2, ids.shape[1], len(tok))
    assert torch.isfinite(out.logits).all()
    feats = projector_features(teacher, pixels)
    assert feats.shape == (2, 16, arch.hidden_size)
    assert torch.allclose(cap.features, feats, atol=1e-6)  # same tensor, from the logits' own pass
    assert len(cap.outputs) == 1  # the vision tower ran once
    with pytest.raises(ModelError, match="no projector output"):
        with capture_projector(teacher) as empty:
            teacher(input_ids=ids[:, -3:])
        _ = empty.features


def test_captured_features_carry_gradients(tok, student_arch):
    student = build_llava(student_arch, tok, seed=0)
    ids, pixels = batch(tok, 16)
    with capture_projector(student) as cap:
        student(input_ids=ids, pixel_values=pixels)
    cap.features.pow(2).mean().backward()
    assert student.model.multi_modal_projector.linear_1.weight.grad is not None
    # vision_feature_layer=-1: the tower's last layer is trained too (with -2 it would get no gradient)
    assert student.model.vision_tower.encoder.layers[-1].mlp.fc2.weight.grad is not None


def test_generate_runs(tok, teacher):
    ids, pixels = batch(tok, 16, b=1)
    out = teacher.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)


def test_image_token_count_mismatch_is_an_error(tok, teacher):
    ids, pixels = batch(tok, 15)
    with pytest.raises(Exception, match=r"(?i)image"):
        teacher(input_ids=ids, pixel_values=pixels)


def test_lora_touches_only_language_model_q_v(tok, student_arch):
    model = build_llava(student_arch, tok, seed=0)
    ids, pixels = batch(tok, 16)
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=pixels).logits
    wrapped = apply_lora(model, r=4, alpha=8, dropout=0.0, targets=LoraConfig().targets)
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


def test_freeze_vision_tower_and_counts(tok, student_arch):
    model = build_llava(student_arch, tok, seed=0)
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


def test_unwrap_sees_through_wrappers(tok, student_arch):
    model = build_llava(student_arch, tok, seed=0)
    holder = torch.nn.Module()
    holder.module = model  # DDP / DeepSpeed engines expose the model as .module
    assert unwrap(holder) is model
    with pytest.raises(ModelError, match="LlavaForConditionalGeneration"):
        unwrap(torch.nn.Linear(2, 2))


def _gradients(model, ids, pixels) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(input_ids=ids, pixel_values=pixels).logits.float().logsumexp(-1).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["full", "lora+frozen tower"])
def test_checkpointing_gives_identical_gradients(tok, student_arch, mode):
    """Non-reentrant activation checkpointing recomputes the same float32 forward in backward: the same
    gradients to the bit (on CPU), with LoRA and a frozen tower too, where it wraps only the LLM."""
    ids, pixels = batch(tok, 16)

    def make():
        torch.manual_seed(0)  # the same LoRA initialisation for both
        model = build_llava(student_arch, tok, seed=0)
        if mode != "full":
            freeze_vision_tower(model)
            model = apply_lora(model, 4, 8, 0.0, LoraConfig().targets)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.1)  # else the adapters' A matrices get no gradient
        return model

    plain, ckpt = make(), make()
    parts = enable_checkpointing(ckpt)
    assert parts == (["language model", "vision tower"] if mode == "full" else ["language model"])
    base = unwrap(ckpt).model
    assert base.language_model.is_activation_checkpointing
    assert base.vision_tower.is_activation_checkpointing == (mode == "full")
    want, got = _gradients(plain, ids, pixels), _gradients(ckpt, ids, pixels)
    assert set(got) == set(want) and len(got) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def test_checkpointing_needs_a_llava():
    with pytest.raises(ModelError, match="gradient_checkpointing: false"):
        enable_checkpointing(torch.nn.Linear(2, 2))


def test_sdpa_attention_equals_eager(tok, arch):
    """Built (and loaded) models use SDPA; its outputs equal eager attention's within float32 rounding,
    with padding (an attention mask) too."""
    sdpa = build_llava(arch, tok, seed=0).eval()
    assert sdpa.config._attn_implementation == ATTENTION == "sdpa"
    assert sdpa.config.text_config._attn_implementation == "sdpa"
    eager = build_llava(arch, tok, seed=0).eval()
    eager.set_attn_implementation("eager")
    assert eager.config.text_config._attn_implementation == "eager"
    ids, pixels = batch(tok, num_image_tokens(sdpa))
    ids = torch.cat([torch.full_like(ids[:, :3], tok.pad_token_id), ids], 1)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # row 0 left-padded
    mask[1, :3] = 0
    with torch.no_grad():
        a = sdpa(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        b = eager(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    torch.testing.assert_close(a[:, 3:], b[:, 3:], rtol=1e-5, atol=1e-5)
