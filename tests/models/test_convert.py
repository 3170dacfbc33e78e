"""GeoChat checkpoint -> HF LLaVA: a tiny model written in GeoChat's layout converts back exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from geodistill.errors import ModelError
from geodistill.models.checkpoints import load_for_inference
from geodistill.models.convert import convert_geochat_checkpoint, interpolate_position_embedding, main
from geodistill.models.llava import num_image_tokens

CORPUS = ["The image shows a harbor with 2 ships {<8><82><16><90>|<69>}.", "[refer] <p>the red ship</p>"] * 8
VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "patch_size": 8,
}


def llama_like_tokenizer() -> PreTrainedTokenizerFast:
    """Like Vicuna's: <unk> <s> </s>, no pad token, no <image>."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def reference_model(v0: int, image_size: int = 32) -> LlavaForConditionalGeneration:
    """The HF model the conversion must reproduce: GeoChat semantics (layer -2, no CLS), <image> = id v0."""
    torch.manual_seed(0)
    text = LlamaConfig(
        vocab_size=v0 + 1,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION, image_size=image_size),
        text_config=text,
        image_token_index=v0,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # the converter fills new token rows with the mean of the others
        for w in (model.get_input_embeddings().weight, model.lm_head.weight):
            w[v0] = w[:v0].mean(0)
    return model


def to_geochat(
    model: LlavaForConditionalGeneration, v0: int, *, with_vision: bool = True
) -> dict[str, torch.Tensor]:
    """The model's weights under GeoChat's key names, without the <image> rows (as GeoChat saves them)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model.") :]
        elif k.startswith("model.multi_modal_projector.linear_"):
            k = "model.mm_projector." + ("0." if "linear_1" in k else "2.") + k.rsplit(".", 1)[1]
        elif k.startswith("model.vision_tower."):
            if not with_vision:
                continue
            k = "model.vision_tower.vision_tower.vision_model." + k[len("model.vision_tower.") :]
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            v = v[:v0]
        out[k] = v.clone()
    # Buffers old checkpoints carry; the converter must drop them.
    out["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    if with_vision:
        out["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    return out


def geochat_config(v0: int, **extra) -> dict:
    """Every field of MBZUAI/geochat-7B's config.json (LLaVA-1.5's saved GeoChatConfig under transformers
    4.31), at the tiny shapes: the converter must take the published file as it is."""
    return {
        "_name_or_path": "/checkpoints/llava-v1.5-7b-geochat-merged",
        "architectures": ["GeoChatLlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "freeze_mm_mlp_adapter": False,
        "hidden_act": "silu",
        "hidden_size": 64,
        "image_aspect_ratio": "pad",
        "image_grid_pinpoints": None,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "max_position_embeddings": 128,
        "mm_hidden_size": 32,
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "model_type": "geochat",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 4,
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.31.0",
        "tune_mm_mlp_adapter": False,
        "use_cache": True,
        "use_mm_proj": True,
        "vocab_size": v0,
        **extra,
    }


def write_geochat(folder: Path, sd: dict[str, torch.Tensor], tok, fmt: str, **config_extra) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(geochat_config(len(tok), **config_extra)))
    tok.save_pretrained(folder)
    keys = list(sd)
    halves = {1: keys[: len(keys) // 2], 2: keys[len(keys) // 2 :]}
    if fmt == "safetensors":
        save_file({k: sd[k].contiguous() for k in keys}, str(folder / "model.safetensors"))
        return folder
    ext = "safetensors" if fmt == "safetensors-sharded" else "bin"
    stem = "model" if ext == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, part in halves.items():
        name = f"{stem}-0000{i}-of-00002.{ext}"
        shard = {k: sd[k].contiguous() for k in part}
        if ext == "safetensors":
            save_file(shard, str(folder / name))
        else:
            torch.save(shard, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    index = f"{stem}.{ext}.index.json"
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (folder / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "transformers_version": "4.31.0"}
    (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def inputs(image_id: int, n_img: int, image_size: int = 32):
    ids = torch.tensor([[1, *[image_id] * n_img, 5, 6, 7, 8]])
    pixels = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(3))
    return ids, pixels


@pytest.mark.parametrize("fmt", ["safetensors", "safetensors-sharded", "bin-sharded"])
def test_converted_checkpoint_reproduces_the_model(tmp_path, fmt):
    tok = llama_like_tokenizer()
    v0 = len(tok)
    ref = reference_model(v0)
    src = write_geochat(tmp_path / "geochat", to_geochat(ref, v0), tok, fmt)
    dst = convert_geochat_checkpoint(src, tmp_path / "hf", {"num_attention_heads": 4}, max_shard_size=40_000)

    # Plain transformers loads it.
    model = LlavaForConditionalGeneration.from_pretrained(dst, local_files_only=True)
    hf_tok = AutoTokenizer.from_pretrained(dst, local_files_only=True)
    assert len(hf_tok) == v0 + 1 == model.config.text_config.vocab_size
    assert hf_tok.convert_tokens_to_ids("<image>") == v0 == model.config.image_token_id
    assert hf_tok.pad_token_id == hf_tok.unk_token_id  # LLaVA pads with <unk>
    assert model.config.vision_feature_layer == -2
    assert model.config.text_config.rms_norm_eps == 1e-5
    assert (dst / "model.safetensors.index.json").is_file()  # small max_shard_size: several shards
    ids, pixels = inputs(v0, 16)
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids, pixel_values=pixels).logits, ref(input_ids=ids, pixel_values=pixels).logits
        )

    # And so does the project's loader, with GeoChat's pad-to-square preprocessing.
    model2, _, transform = load_for_inference(dst, device="cpu")
    assert num_image_tokens(model2) == 16 and transform.size == 32 and transform.pad_to_square
    assert sorted(p.name for p in tmp_path.iterdir()) == ["geochat", "hf"]  # no temporary folder left


@pytest.mark.parametrize("layout", ["vision_model", "clip_model"])
def test_vision_tower_from_a_clip_folder_is_interpolated(tmp_path, layout):
    """LLaVA checkpoints may lack the tower; GeoChat then loads CLIP and stretches its position grid."""
    tok = llama_like_tokenizer()
    v0 = len(tok)
    ref = reference_model(v0)
    clip = CLIPVisionModel(CLIPVisionConfig(**VISION, image_size=16))  # a 2x2 grid, as CLIP-336's 24x24
    if layout == "vision_model":  # transformers 5 saves a bare CLIPVisionModel without 'vision_model.'
        clip.save_pretrained(tmp_path / "clip")
    else:  # the Hub's openai/clip-vit-*: a whole CLIPModel, text tower included
        (tmp_path / "clip").mkdir()
        vision_config = {**VISION, "image_size": 16, "model_type": "clip_vision_model"}
        (tmp_path / "clip" / "config.json").write_text(
            json.dumps({"model_type": "clip", "vision_config": vision_config})
        )
        sd = {"vision_model." + k: v.clone() for k, v in clip.state_dict().items()}
        sd |= {
            "text_model.embeddings.token_embedding.weight": torch.zeros(4, 8),
            "logit_scale": torch.zeros(()),
        }
        save_file(sd, str(tmp_path / "clip" / "model.safetensors"))
    src = write_geochat(tmp_path / "geochat", to_geochat(ref, v0, with_vision=False), tok, "safetensors")
    with pytest.raises(ModelError, match="no vision tower weights"):
        convert_geochat_checkpoint(src, tmp_path / "hf")
    dst = convert_geochat_checkpoint(src, tmp_path / "hf", tmp_path / "clip", image_size=32)
    model, _, _ = load_for_inference(dst, device="cpu")
    got = model.model.vision_tower.embeddings.position_embedding.weight.detach()
    old = clip.embeddings.position_embedding.weight.detach()
    assert got.shape == (1 + 4 * 4, 32)
    assert torch.equal(got[0], old[0])  # CLS untouched
    grid = got[1:].reshape(4, 4, 32)
    for (r, c), (r2, c2) in {(0, 0): (0, 0), (0, 3): (0, 1), (3, 0): (1, 0), (3, 3): (1, 1)}.items():
        assert torch.allclose(grid[r, c], old[1 + 2 * r2 + c2], atol=1e-5)  # align_corners keeps corners
    assert torch.equal(
        model.model.vision_tower.encoder.layers[2].mlp.fc1.weight, clip.encoder.layers[2].mlp.fc1.weight
    )
    ids, pixels = inputs(v0, 16)
    assert model(input_ids=ids, pixel_values=pixels).logits.shape == (1, ids.shape[1], v0 + 1)


def test_interpolation_properties():
    w = torch.randn(1 + 9, 5)
    assert interpolate_position_embedding(w, 3) is w
    flat = torch.ones(1 + 4, 5) * torch.arange(5.0)
    assert torch.allclose(
        interpolate_position_embedding(flat, 6)[1:], torch.ones(36, 1) * torch.arange(5.0), atol=1e-6
    )
    with pytest.raises(ModelError, match="square"):
        interpolate_position_embedding(torch.randn(1 + 5, 2), 3)


def test_layout_problems_are_refused(tmp_path):
    tok = llama_like_tokenizer()
    v0 = len(tok)
    sd = to_geochat(reference_model(v0), v0)
    linear = write_geochat(tmp_path / "linear", sd, tok, "safetensors", mm_projector_type="linear")
    with pytest.raises(ModelError, match="mlp2x_gelu"):
        convert_geochat_checkpoint(linear, tmp_path / "out")
    odd = write_geochat(tmp_path / "odd", {**sd, "model.image_newline": torch.zeros(64)}, tok, "safetensors")
    with pytest.raises(ModelError, match=r"model\.image_newline"):
        convert_geochat_checkpoint(odd, tmp_path / "out", {"num_attention_heads": 4})
    short = {**sd, "model.embed_tokens.weight": sd["model.embed_tokens.weight"][:-2]}
    mismatched = write_geochat(tmp_path / "rows", short, tok, "safetensors")
    with pytest.raises(ModelError, match=r"lm_head has .* rows, embed_tokens"):
        convert_geochat_checkpoint(mismatched, tmp_path / "out", {"num_attention_heads": 4})
    short["lm_head.weight"] = sd["lm_head.weight"][:-2]  # the tokenizer's last 2 are learnt, not added
    wrong_vocab = write_geochat(tmp_path / "vocab", short, tok, "safetensors")
    with pytest.raises(ModelError, match="rows but the tokenizer"):
        convert_geochat_checkpoint(wrong_vocab, tmp_path / "out", {"num_attention_heads": 4})
    unpadded = write_geochat(tmp_path / "unpadded", padded(sd, v0 + 3), tok, "safetensors")
    with pytest.raises(ModelError, match="neither padding"):  # 3 extra rows: not a multiple of 64
        convert_geochat_checkpoint(unpadded, tmp_path / "out", {"num_attention_heads": 4})
    heads = write_geochat(tmp_path / "heads", sd, tok, "safetensors")
    with pytest.raises(ModelError, match="do not fit"):  # a config override that contradicts the weights
        convert_geochat_checkpoint(
            heads, tmp_path / "out", {"num_attention_heads": 4, "intermediate_size": 7}
        )
    assert not (tmp_path / "out").exists()


def test_cli(tmp_path, capsys):
    tok = llama_like_tokenizer()
    v0 = len(tok)
    src = write_geochat(tmp_path / "geochat", to_geochat(reference_model(v0), v0), tok, "safetensors")
    assert (
        main([str(src), str(tmp_path / "hf"), "--vision", '{"num_attention_heads": 4}', "--dtype", "float16"])
        == 0
    )
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llava"
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert model.dtype == torch.float16
    assert main([str(tmp_path / "missing"), str(tmp_path / "x")]) == 1
    assert "no config.json" in capsys.readouterr().err


def padded(sd: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """Embedding and lm_head grown to ``rows`` with random rows (how llava-hf pads to a multiple of 64)."""
    gen = torch.Generator().manual_seed(5)
    out = dict(sd)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        w = sd[key]
        out[key] = torch.cat([w, torch.randn(rows - w.shape[0], w.shape[1], generator=gen)])
    return out


def test_a_padded_vocabulary_is_trimmed_with_a_note(tmp_path, capsys):
    """GeoChat-7B in the published layout (sharded .bin + index), its vocabulary padded to 64 rows."""
    tok = llama_like_tokenizer()
    v0 = len(tok)
    rows = (v0 // 64 + 1) * 64  # e.g. 192 rows for 150 tokens, as 32064 for 32002
    ref = reference_model(v0)
    src = write_geochat(tmp_path / "geochat", padded(to_geochat(ref, v0), rows), tok, "bin-sharded")
    assert main([str(src), str(tmp_path / "hf"), "--vision", '{"num_attention_heads": 4}']) == 0
    assert f"rows {v0}..{rows - 1} pad the vocabulary" in capsys.readouterr().err
    record = json.loads((tmp_path / "hf" / "conversion.json").read_text())
    assert record["source_vocab_rows"] == rows and record["vocab_size"] == v0 + 1
    assert len(record["notes"]) == 1 and "dropped" in record["notes"][0]
    model, hf_tok, _ = load_for_inference(tmp_path / "hf", device="cpu")
    assert len(hf_tok) == v0 + 1 == model.config.text_config.vocab_size
    ids, pixels = inputs(v0, 16)
    with torch.no_grad():  # the padding was never part of the model: the logits are the reference's
        assert torch.equal(
            model(input_ids=ids, pixel_values=pixels).logits, ref(input_ids=ids, pixel_values=pixels).logits
        )


def test_added_tokens_beyond_the_rows_get_mean_rows_with_a_note(tmp_path):
    """llava-hf's tokenizer (<image>, <pad> added) over GeoChat's rows: two new rows, not a refusal."""
    tok = llama_like_tokenizer()
    v0 = len(tok)
    ref = reference_model(v0)
    sd = to_geochat(ref, v0)
    hf_like = llama_like_tokenizer()
    hf_like.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    hf_like.add_special_tokens({"pad_token": "<pad>"})
    src = write_geochat(tmp_path / "geochat", sd, tok, "safetensors")
    hf_like.save_pretrained(tmp_path / "tok")
    dst = convert_geochat_checkpoint(
        src, tmp_path / "hf", {"num_attention_heads": 4}, tokenizer_dir=tmp_path / "tok"
    )
    (note,) = json.loads((dst / "conversion.json").read_text())["notes"]
    assert "['<image>', '<pad>']" in note and "mean of the trained rows" in note
    model, hf_tok, _ = load_for_inference(dst, device="cpu")
    assert len(hf_tok) == v0 + 2 == model.config.text_config.vocab_size
    assert model.config.image_token_id == v0 and hf_tok.pad_token == "<pad>"
    emb = model.get_input_embeddings().weight.detach()
    assert torch.equal(emb[v0 + 1], sd["model.embed_tokens.weight"].mean(0))
    ids, pixels = inputs(v0, 16)
    with torch.no_grad():
        got = model(input_ids=ids, pixel_values=pixels).logits[..., : v0 + 1]
        assert torch.equal(got, ref(input_ids=ids, pixel_values=pixels).logits)
