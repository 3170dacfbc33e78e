"""Teacher and student as module trees on the meta device, and the sizes the arithmetic reads off them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration

from geodistill.config import LlavaArch
from geodistill.models.llava import llava_config, num_image_tokens

PARTS = ("vision tower", "position embeddings", "projector", "LLM embeddings", "LLM decoder", "LLM lm_head")
"""Parameter groups; "vision tower" excludes its position embeddings, "LLM decoder" holds the final norm."""
TABLE8_PARTS = ("position embeddings", "projector", "LLM embeddings", "LLM decoder", "LLM lm_head")
"""What the paper's Table 8 counts (6,760.72 M and 13,048.66 M): the parameters GeoChat leaves with
``requires_grad=True``. Its ``clip_encoder.py`` freezes CLIP, then replaces the position embedding by a fresh
(1 + 36*36)-row ``nn.Embedding``, which stays trainable by flag (the tower runs under ``no_grad``, so it never
learns). At Llama's 32,000-token vocabulary these parts equal Table 8 to the printed digit."""
TABLE8_VOCAB = 32000


@dataclass(frozen=True)
class _SizeOnlyVocab:
    """What ``llava_config`` reads from a tokenizer, to plan without one: only the size matters here; ids as
    Llama's (unk 0, bos 1, eos 2), ``<image>`` last as the converter adds it."""

    size: int
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    unk_token_id: int = 0
    unk_token: str = "<unk>"

    def __len__(self) -> int:
        return self.size

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.size - 1


def model_config(source: str, path: str, arch: LlavaArch, vocab: int) -> tuple[LlavaConfig, str]:
    """The config of an HF LLaVA checkpoint folder (``source`` path with a llava config.json there), else
    ``arch`` at ``vocab``; with a note saying which."""
    file = Path(path) / "config.json"
    if source == "path" and file.is_file() and json.loads(file.read_text()).get("model_type") == "llava":
        return LlavaConfig.from_pretrained(path, local_files_only=True), f"config.json of {path}"
    note = f"arch from the params, vocabulary {vocab:,}"
    if source == "path":
        note += f" ({path or 'the path'} holds no HF LLaVA config.json yet)"
    return llava_config(arch, _SizeOnlyVocab(vocab)), note  # type: ignore[arg-type]


def meta_llava(config: LlavaConfig) -> LlavaForConditionalGeneration:
    """The model's module tree on the meta device: shapes, no weights, no memory."""
    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)


@dataclass(frozen=True)
class ModelShape:
    """The sizes the arithmetic needs, read off a (meta-built) LLaVA."""

    name: str
    source: str
    params: dict[str, int]
    """Parameters per part (PARTS)."""
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    attn_width: int
    """Query width: heads x head_dim."""
    kv_width: int
    """Key (= value) width: kv heads x head_dim."""
    decoder_linears: tuple[tuple[str, int, int], ...]
    """(name, in, out) of every Linear in one decoder layer."""
    lm_head_macs: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_tokens: int
    """Tokens through the tower: patches + CLS."""
    vision_layer_macs: int
    """Linear multiply-adds per token in one CLIP layer."""
    patch_macs: int
    """Patch-embedding multiply-adds per patch."""
    image_tokens: int
    """Image tokens the LLM sees per image."""
    projector_linears: tuple[tuple[str, int, int], ...]
    """(name, in, out) of the projector's Linear layers, input side first."""
    largest_module: int
    """Parameters of the largest single module (ZeRO-3 gathers one at a time)."""

    @property
    def total(self) -> int:
        return sum(self.params.values())

    @property
    def projector_macs(self) -> int:
        """Projector multiply-adds per image token."""
        return sum(i * o for _, i, o in self.projector_linears)

    @property
    def decoder_macs(self) -> int:
        """Linear multiply-adds per token in one decoder layer."""
        return sum(i * o for _, i, o in self.decoder_linears)


def _part(name: str) -> str:
    if "vision_tower" in name:
        return "position embeddings" if "position_embedding" in name else "vision tower"
    if "multi_modal_projector" in name:
        return "projector"
    if "embed_tokens" in name:
        return "LLM embeddings"
    return "LLM lm_head" if "lm_head" in name else "LLM decoder"


def _linears(module: nn.Module) -> tuple[tuple[str, int, int], ...]:
    return tuple(
        (n, m.in_features, m.out_features) for n, m in module.named_modules() if isinstance(m, nn.Linear)
    )


def shape_of(model: LlavaForConditionalGeneration, name: str, source: str) -> ModelShape:
    """Parameters by part and the layer sizes of ``model`` (any device; meta is enough)."""
    params = dict.fromkeys(PARTS, 0)
    for pname, p in model.named_parameters():
        params[_part(pname)] += p.numel()
    text, vision = model.config.text_config, model.config.vision_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    tower = model.model.vision_tower
    patch = tower.embeddings.patch_embedding.weight
    leaves = [m for m in model.modules() if not list(m.children())]
    return ModelShape(
        name=name,
        source=source,
        params=params,
        vocab=text.vocab_size,
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        layers=text.num_hidden_layers,
        heads=text.num_attention_heads,
        attn_width=text.num_attention_heads * head_dim,
        kv_width=text.num_key_value_heads * head_dim,
        decoder_linears=_linears(model.model.language_model.layers[0]),
        lm_head_macs=model.lm_head.in_features * model.lm_head.out_features,
        vision_hidden=vision.hidden_size,
        vision_intermediate=vision.intermediate_size,
        vision_layers=vision.num_hidden_layers,
        vision_tokens=tower.embeddings.num_positions,
        vision_layer_macs=sum(i * o for _, i, o in _linears(tower.encoder.layers[0])),
        patch_macs=patch.numel(),  # (D, 3, p, p): D x 3p^2 per patch
        image_tokens=num_image_tokens(model.config),
        projector_linears=_linears(model.model.multi_modal_projector),
        largest_module=max(sum(p.numel() for p in m.parameters(recurse=False)) for m in leaves),
    )
