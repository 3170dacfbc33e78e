"""Teacher and student LLaVA models: built from an architecture, wrapped for training, inspected.

A model is a transformers ``LlavaForConditionalGeneration`` (CLIP ViT tower, LLaVA-1.5's
linear-GELU-linear projector, Llama decoder). Conventions every stage relies on:

- the model's vocabulary equals ``len(tokenizer)`` and ``config.image_token_id`` is the tokenizer's
  ``<image>`` id; ``input_ids`` carry one ``<image>`` per image token (the template expands it);
- image tokens per image = ``num_image_tokens(config)``: (image_size / patch_size)^2 with the CLS
  token dropped (``vision_feature_select_strategy="default"``, LLaVA-1.5's "patch" features);
- built models read the *last* CLIP layer (``vision_feature_layer=-1``) so every tower layer is trained
  and used (with LLaVA's -2 a small tower wastes its last layer; docs/design.md). Converted GeoChat
  checkpoints keep their -2. CLIP's ``post_layernorm`` only feeds the pooled CLS output, which LLaVA
  never uses: under DDP freeze the tower or pass ``find_unused_parameters=True``.

Loading and saving checkpoints: :mod:`geodistill.models.checkpoints`; the image transform:
:mod:`geodistill.models.transform`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
)
from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

from geodistill.config import LlavaArch
from geodistill.errors import ModelError
from geodistill.models.tokenizer import image_token_id

VISION_FEATURE_LAYER = -1
"""CLIP layer whose output feeds the projector in built models (every layer trained and used)."""
ATTENTION = "sdpa"
"""Attention kernel of every model built (here) or loaded (``checkpoints``): torch's
scaled_dot_product_attention (fused kernels on GPUs, no T x T probabilities kept for backward); equal to
eager attention within float32 rounding (tests/models/test_llava.py)."""


# ---------------------------------------------------------------------------------------------- build


def llava_config(
    arch: LlavaArch, tokenizer: PreTrainedTokenizerBase, *, vision_feature_layer: int = VISION_FEATURE_LAYER
) -> LlavaConfig:
    """The transformers config of ``arch`` for ``tokenizer`` (vocab, special and image token ids)."""
    problems = arch.problems()
    if not (-arch.vision_layers - 1 <= vision_feature_layer <= arch.vision_layers):
        problems.append(
            f"vision_feature_layer {vision_feature_layer} is outside a {arch.vision_layers}-layer tower"
        )
    if problems:
        raise ModelError("invalid model architecture: " + "; ".join(problems))
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        max_position_embeddings=arch.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,  # Vicuna/Llama keep lm_head separate
        initializer_range=arch.init_std,
    )
    vision = CLIPVisionConfig(
        hidden_size=arch.vision_hidden_size,
        intermediate_size=arch.vision_intermediate_size,
        num_hidden_layers=arch.vision_layers,
        num_attention_heads=arch.vision_heads,
        image_size=arch.image_size,
        patch_size=arch.patch_size,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id(tokenizer),
        image_seq_length=arch.num_image_tokens,
        projector_hidden_act="gelu",  # mlp2x_gelu: Linear, exact GELU, Linear (as GeoChat's nn.GELU())
        vision_feature_select_strategy="default",  # drop CLS: (image_size / patch)^2 image tokens
        vision_feature_layer=vision_feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
        attn_implementation=ATTENTION,
    )


def build_llava(
    arch: LlavaArch,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    *,
    vision_feature_layer: int = VISION_FEATURE_LAYER,
) -> LlavaForConditionalGeneration:
    """A freshly initialised LLaVA of ``arch`` (float32, CPU). The same seed gives identical weights;
    the caller's global RNG state is left untouched."""
    config = llava_config(arch, tokenizer, vision_feature_layer=vision_feature_layer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    if arch.vision_positions == "sincos":
        init_patch_positions(model)
    set_generation_ids(model, tokenizer)
    return model


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid * grid, dim) 2-D sine-cosine table (MAE's), rows in patch order (row-major), centred over
    the positions so that no dimension carries a constant offset."""
    if dim % 4:
        raise ModelError(f"a 2-D sine-cosine position table needs a hidden size divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")  # fmt: skip

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.flatten()[:, None] * omega[None]  # (P, dim / 4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(ys), encode(xs)], dim=1)  # (P, dim)
    return (table - table.mean(dim=0)).float()


def init_patch_positions(model: nn.Module) -> None:
    """Start a built tower's patch position embeddings from a 2-D sine-cosine table as strong as a
    patch's content (the CLS row stays as initialised): ``arch.vision_positions = "sincos"``.

    CLIP initialises position embeddings with std 0.02, about 1/25 of what a patch's content
    contributes at init, and training from scratch barely grows them: a linear probe then cannot tell
    which patch an image token is (``python -m geodistill.bench.grounding``), so no language model on
    top can ground. GeoChat's pretrained CLIP knows where its patches are; this table stands in for
    that (docs/design.md).
    """
    emb = vision_embeddings(model)
    cfg = emb.config
    grid = cfg.image_size // cfg.patch_size
    # Expected rms of a patch embedding at init: std * sqrt(fan_in), for unit-variance pixels.
    fan_in = cfg.num_channels * cfg.patch_size**2
    content_rms = cfg.initializer_range * cfg.initializer_factor * fan_in**0.5
    table = sincos_2d(grid, cfg.hidden_size)
    table *= content_rms / table.pow(2).mean().sqrt()
    with torch.no_grad():
        emb.position_embedding.weight[1:] = table


def vision_embeddings(model: nn.Module) -> CLIPVisionEmbeddings:
    """The CLIP tower's input layer (patch and position embeddings) of a LLaVA, wrapped or not."""
    for module in unwrap(model).modules():
        if isinstance(module, CLIPVisionEmbeddings):
            return module
    raise ModelError(f"{type(unwrap(model)).__name__} has no CLIP vision embeddings")


def set_generation_ids(model: LlavaForConditionalGeneration, tok: PreTrainedTokenizerBase) -> None:
    """Make ``model.generate`` stop and pad with ``tok``'s ids (built and loaded models alike)."""
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )


def num_image_tokens(config_or_model: LlavaConfig | nn.Module) -> int:
    """Image tokens per image the model expects in ``input_ids``."""
    cfg = config_or_model if isinstance(config_or_model, LlavaConfig) else unwrap(config_or_model).config
    n = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    return n + (1 if cfg.vision_feature_select_strategy == "full" else 0)


# -------------------------------------------------------------------------------------------- wrappers


def is_peft(model: nn.Module) -> bool:
    """Whether ``model`` is wrapped in peft adapters (peft imported only when asked)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def unwrap(model: nn.Module) -> LlavaForConditionalGeneration:
    """The ``LlavaForConditionalGeneration`` inside DDP / DeepSpeed (``.module``) and peft wrappers."""
    m = model
    for _ in range(4):  # wrappers nest at most a few deep (DeepSpeed(DDP(Peft(model))))
        if isinstance(m, LlavaForConditionalGeneration):
            return m
        if is_peft(m):
            m = m.get_base_model()  # type: ignore[operator]
        elif isinstance(getattr(m, "module", None), nn.Module):
            m = m.module  # type: ignore[assignment]
        else:
            break
    raise ModelError(
        f"expected a LlavaForConditionalGeneration (possibly wrapped), got {type(model).__name__}"
    )


def device_of(model: nn.Module) -> torch.device:
    """The device of ``model``'s (first) parameter: where its inputs must go."""
    return next(model.parameters()).device


def freeze_vision_tower(model: nn.Module) -> int:
    """Stop gradients into the CLIP tower (GeoChat's default). Returns the number of frozen parameters."""
    params = list(unwrap(model).model.vision_tower.parameters())
    for p in params:
        p.requires_grad_(False)
    return sum(p.numel() for p in params)


def apply_lora(
    model: nn.Module,
    r: int,
    alpha: int,
    dropout: float,
    targets: Sequence[str],
    *,
    train_projector: bool = True,
) -> nn.Module:
    """Wrap ``model`` in peft LoRA adapters on the *language model's* ``targets`` (GeoChat's recipe).

    The module regex is anchored on ``language_model``: plain names like ``q_proj`` also match CLIP's
    attention. peft freezes every other weight; the projector stays trainable when ``train_projector``
    (LLaVA/GeoChat train it next to the adapters). The model is modified in place and returned wrapped.
    """
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise ModelError(f"LoRA rank must be >= 1, got {r}")
    names = "|".join(re.escape(t) for t in targets)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=rf".*language_model.*\.({names})",
        bias="none",
    )
    wrapped = get_peft_model(unwrap(model), config)
    if train_projector:
        for p in unwrap(wrapped).model.multi_modal_projector.parameters():
            p.requires_grad_(True)
    return wrapped


def enable_checkpointing(model: nn.Module) -> list[str]:
    """Activation checkpointing of every LLaVA inside ``model`` (a peft/DDP/KD wrapper too): the language
    model's decoder layers, and the vision tower's layers when any tower parameter trains (a frozen tower
    keeps no activations for backward, so checkpointing it would only cost a recompute). Returns the parts.

    Non-reentrant (``use_reentrant=False``): gradients are the same as without, and it needs no input that
    requires grad, so it works under LoRA where every base weight is frozen.
    """
    bases = [m for m in model.modules() if isinstance(m, LlavaForConditionalGeneration)]
    if not bases:
        raise ModelError(
            f"gradient_checkpointing is for LLaVA models; {type(model).__name__} holds none: set "
            "train.gradient_checkpointing: false"
        )
    parts = []
    for base in bases:
        parts.append("language model")
        base.model.language_model.activation_checkpointing_enable({"use_reentrant": False})
        if any(p.requires_grad for p in base.model.vision_tower.parameters()):
            base.model.vision_tower.activation_checkpointing_enable({"use_reentrant": False})
            parts.append("vision tower")
    return parts


def merge_lora(model: nn.Module) -> LlavaForConditionalGeneration:
    """Fold LoRA adapters into the base weights (for export); a model without adapters is returned as is."""
    if is_peft(model):
        return model.merge_and_unload()  # type: ignore[operator]
    return unwrap(model)


# -------------------------------------------------------------------------------- projector features


def projector_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, P, D) projector outputs (image tokens as the LLM sees them) for (B, 3, H, W) pixels.

    transformers 5.24: ``get_image_features`` returns a ``BaseModelOutputWithPooling`` whose
    ``pooler_output`` is a *list* of per-image (P, D) tensors.
    """
    base = unwrap(model)
    out = base.get_image_features(pixel_values=pixel_values.to(base.dtype))
    return torch.stack(list(out.pooler_output))


@dataclass
class ProjectorCapture:
    """Projector outputs recorded during forward passes inside ``capture_projector``."""

    outputs: list[torch.Tensor] = field(default_factory=list)
    """One (B, P, D) tensor per projector call, in call order (still attached to the autograd graph)."""

    @property
    def features(self) -> torch.Tensor:
        """(B, P, D) output of the latest forward."""
        if not self.outputs:
            raise ModelError("no projector output was captured: the forward pass had no pixel_values")
        return self.outputs[-1]


@contextmanager
def capture_projector(model: nn.Module) -> Iterator[ProjectorCapture]:
    """Record the projector's outputs of forwards run inside the block, so L_align uses the same pass
    as the logits (the vision tower runs once)::

        with capture_projector(student) as cap:
            logits = student(input_ids=..., pixel_values=..., attention_mask=...).logits
        feats = cap.features  # (B, P, D), differentiable

    (transformers 5.24 also returns them as ``out.image_outputs.pooler_output``, a list of (P, D); the
    hook does not depend on that output format and sees through peft/DDP/DeepSpeed wrappers.)
    """
    cap = ProjectorCapture()
    projector = unwrap(model).model.multi_modal_projector

    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        cap.outputs.append(output)

    handle = projector.register_forward_hook(hook)
    try:
        yield cap
    finally:
        handle.remove()


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts: total, trainable, and per component (vision, projector, language_model; the
    language model includes embeddings, lm_head and any LoRA adapters). Tied weights count once."""
    counts = {"total": 0, "trainable": 0, "vision": 0, "projector": 0, "language_model": 0}
    for name, p in model.named_parameters():
        n = p.numel()
        counts["total"] += n
        if p.requires_grad:
            counts["trainable"] += n
        if "vision_tower" in name:
            counts["vision"] += n
        elif "multi_modal_projector" in name:
            counts["projector"] += n
        else:
            counts["language_model"] += n
    return counts
