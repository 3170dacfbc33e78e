"""FLOPs, memory per GPU and cache bytes of a run, from ModelShapes (conventions: the package docstring)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from geodistill.cache import codec, feature_codec
from geodistill.models.features import pool_image_features
from geodistill.plan.inputs import PRECISION_BYTES, RunPlan
from geodistill.plan.shapes import ModelShape

TARGET_LOGPROB_BYTES = 4  # float32 per cached token (cache/store.py)
OFFSET_BYTES = 8  # int64 token_offsets per record


# ----------------------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class Flops:
    """Matmul FLOPs of a forward, by part."""

    vision: float = 0.0
    projector: float = 0.0
    linear: float = 0.0
    """Decoder linear layers, LoRA adapters included."""
    attention: float = 0.0
    """QK^T and AV of every decoder layer (the quadratic term)."""
    lm_head: float = 0.0

    @property
    def total(self) -> float:
        return self.vision + self.projector + self.linear + self.attention + self.lm_head

    def __add__(self, other: Flops) -> Flops:
        return Flops(
            *(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True))
        )


def lora_macs(m: ModelShape, plan: RunPlan) -> int:
    """LoRA multiply-adds per token per decoder layer (= its parameters per layer): r(in + out) per target."""
    if plan.lora_r == 0:
        return 0
    return sum(
        plan.lora_r * (i + o) for n, i, o in m.decoder_linears if n.rsplit(".", 1)[-1] in plan.lora_targets
    )


def image_flops(m: ModelShape) -> Flops:
    """One image through the CLIP tower (patch embedding, every layer: all run even when LLaVA reads -2) and
    the projector."""
    n = m.vision_tokens
    layer = 2 * n * m.vision_layer_macs + 4 * n * n * m.vision_hidden  # linears + QK^T, AV
    return Flops(
        vision=2 * (n - 1) * m.patch_macs + m.vision_layers * layer,
        projector=2 * m.image_tokens * m.projector_macs,
    )


def llm_flops(m: ModelShape, q: int, kv: int, lora: int = 0) -> Flops:
    """``q`` new tokens through the LLM attending to ``kv`` tokens (kv >= q: a cached prefix), lm_head on the
    ``q`` positions (transformers computes logits at every position)."""
    return Flops(
        linear=2 * q * m.layers * (m.decoder_macs + lora),
        attention=4 * q * kv * m.attn_width * m.layers,
        lm_head=2 * q * m.lm_head_macs,
    )


def record_tokens(m: ModelShape, plan: RunPlan) -> int:
    """Sequence length of one record: image tokens + text tokens."""
    return m.image_tokens + plan.text_tokens


def sample_flops(m: ModelShape, plan: RunPlan, lora: int = 0) -> Flops:
    """Forward FLOPs of one record (one image + its text)."""
    t = record_tokens(m, plan)
    return image_flops(m) + llm_flops(m, t, t, lora)


def train_flops(m: ModelShape, plan: RunPlan) -> float:
    """FLOPs of one record in a distillation step: forward, backward (package docstring), recompute.

    Inputs that need no gradient skip their matmul's input gradient: the pixels (patch embedding) and, with a
    frozen tower, the projector's first layer."""
    lora = lora_macs(m, plan)
    fwd = sample_flops(m, plan, lora)
    adapters = 2 * record_tokens(m, plan) * m.layers * lora
    full = plan.lora_r == 0
    vision_trains = not plan.freeze_vision
    patch_embedding = 2 * (m.vision_tokens - 1) * m.patch_macs
    _, first_in, first_out = m.projector_linears[0]
    into_tower = 0 if vision_trains else 2 * m.image_tokens * first_in * first_out
    backward = (
        (2 * fwd.vision - patch_embedding if vision_trains else 0.0)
        + 2 * fwd.projector - into_tower  # weight gradients + input gradients
        + (fwd.linear - adapters) * (2 if full else 1)
        + 2 * adapters
        + 2 * fwd.attention
        + fwd.lm_head * (2 if full else 1)
    )
    recompute = fwd.linear + fwd.attention + (fwd.vision if vision_trains else 0.0)
    return fwd.total + backward + (recompute if plan.checkpointing else 0.0)


def teacher_pass_flops(t: ModelShape, plan: RunPlan) -> tuple[float, float]:
    """Teacher FLOPs over every record: (plain: each record's whole sequence and image, prefix reuse: each
    image's prefix — its tower, image tokens and shared text — once, then each record's rest against it)."""
    full = record_tokens(t, plan)
    prefix = t.image_tokens + plan.prefix_text_tokens
    rest = full - prefix
    images = plan.records / plan.records_per_image
    plain = plan.records * sample_flops(t, plan).total
    reuse = images * (image_flops(t) + llm_flops(t, prefix, prefix)).total
    reuse += plan.records * llm_flops(t, rest, full).total
    return plain, reuse


# ---------------------------------------------------------------------------------------- memory


def lora_params(m: ModelShape, plan: RunPlan) -> int:
    return m.layers * lora_macs(m, plan)


def trainable_params(m: ModelShape, plan: RunPlan) -> int:
    """The projector always; the LLM whole (lora_r 0) or its adapters; the tower when not frozen."""
    out = m.params["projector"] + lora_params(m, plan)
    if plan.lora_r == 0:
        out += sum(v for k, v in m.params.items() if k.startswith("LLM"))
    if not plan.freeze_vision:
        out += m.params["vision tower"] + m.params["position embeddings"]
    return out


def lora_dropout_inputs(m: ModelShape, plan: RunPlan) -> int:
    """Values per token per decoder layer that LoRA dropout keeps (each adapter's dropped input)."""
    if not plan.lora_r or plan.lora_dropout == 0:
        return 0
    return sum(i for n, i, _ in m.decoder_linears if n.rsplit(".", 1)[-1] in plan.lora_targets)


def decoder_layer_bytes(
    m: ModelShape, batch: int, tokens: int, nbytes: int, attention: str, dropped: int = 0
) -> int:
    """What one Llama decoder layer keeps for backward, ``batch`` sequences of ``tokens``: per token the two
    RMSNorm inputs and outputs (4h), q and the attention output (2 x heads*head_dim), k and v (2 x kv width),
    gate, SiLU(gate), up and their product (4 x intermediate), ``dropped`` LoRA dropout inputs (+ a 1-byte
    mask each); eager attention adds the softmax output per head (fp32 + its cast)."""
    per_token = 4 * m.hidden + 2 * m.attn_width + 2 * m.kv_width + 4 * m.intermediate
    out = batch * tokens * (per_token * nbytes + dropped * (nbytes + 1))
    if attention == "eager":
        out += batch * m.heads * tokens * tokens * (4 + nbytes)
    return out


def _vision_layer_bytes(m: ModelShape, batch: int, nbytes: int) -> int:
    """One CLIP layer's saved tensors: 2 LayerNorm inputs and outputs, q, k, v, attention output (8 x width),
    fc1 output and its GELU (2 x intermediate)."""
    return batch * m.vision_tokens * (8 * m.vision_hidden + 2 * m.vision_intermediate) * nbytes


def logits_bytes(m: ModelShape, plan: RunPlan, batch: int, nbytes: int) -> int:
    """Logits at every position in the model's dtype, plus fp32 log-probabilities at the supervised tokens."""
    return batch * m.vocab * (record_tokens(m, plan) * nbytes + plan.answer_tokens * 4)


def train_memory(m: ModelShape, plan: RunPlan, teacher: ModelShape | None = None) -> dict[str, float]:
    """Bytes per GPU for distillation, by kind (module docstring; ``teacher`` with on-policy terms on)."""
    nb = PRECISION_BYTES[plan.precision]
    trained = trainable_params(m, plan)
    weights = (m.total + lora_params(m, plan)) * nb
    if plan.zero == 3:
        weights = weights / plan.gpus + m.largest_module * nb
    b, t = plan.micro_batch, record_tokens(m, plan)
    layer = decoder_layer_bytes(m, b, t, nb, plan.attention, lora_dropout_inputs(m, plan))
    decoder = m.layers * b * t * m.hidden * nb + layer if plan.checkpointing else m.layers * layer
    vision = 0 if plan.freeze_vision else m.vision_layers * _vision_layer_bytes(m, b, nb)
    projector = b * m.image_tokens * (m.vision_hidden + 2 * m.hidden) * nb  # input, linear_1 out, GELU out
    optimizer = trained * (8 + (4 if nb < 4 else 0))  # 2 fp32 moments (+ fp32 masters in 16-bit training)
    out = {
        "weights": weights,
        "gradients": trained * nb / (plan.gpus if plan.zero >= 2 else 1),
        "optimizer (AdamW moments, fp32 masters)": optimizer / (plan.gpus if plan.zero >= 1 else 1),
        "activations": decoder + vision + projector,
        "logits": logits_bytes(m, plan, b, nb),
    }
    if teacher is not None:
        out["live teacher weights (on-policy)"] = teacher.total * PRECISION_BYTES[plan.teacher_precision]
    return out


def teacher_memory(t: ModelShape, plan: RunPlan, *, reuse: bool) -> dict[str, float]:
    """Bytes per GPU for the teacher pass (no gradients; each rank holds the whole teacher)."""
    nb, b = PRECISION_BYTES[plan.teacher_precision], plan.teacher_batch
    tokens = record_tokens(t, plan)
    out = {
        "weights": t.total * nb,
        "activations (one layer at a time)": decoder_layer_bytes(t, b, tokens, nb, plan.attention)
        + _vision_layer_bytes(t, b, nb),
        "logits": logits_bytes(t, plan, b, nb),
    }
    if reuse:
        out["KV cache (prefix expanded to the batch)"] = 2 * t.layers * b * tokens * t.kv_width * nb
    return out


# ----------------------------------------------------------------------------------------- cache


@dataclass(frozen=True)
class CacheSize:
    """Uncompressed size of the teacher cache (zstd gains ~1.5x on the top-k arrays, less on features)."""

    token_bytes: int
    """Per supervised token: top-k ids and values, the float32 target log-prob."""
    tokens: int
    image_tokens: int
    """Feature rows per image after pooling."""
    image_bytes: int
    """Features of one image."""
    images: int
    records: int

    @property
    def total_tokens_bytes(self) -> int:
        return self.tokens * self.token_bytes + (self.records + 1) * OFFSET_BYTES

    @property
    def total_features_bytes(self) -> int:
        return self.images * self.image_bytes


def cache_size(t: ModelShape, plan: RunPlan) -> CacheSize:
    """Cache bytes for the plan's records (array layout: cache/store.py, value encodings: cache/codec.py)."""
    values = codec.value_arrays(plan.encoding, plan.k)
    per_token = (
        plan.k * codec.id_dtype(t.vocab).itemsize
        + sum(math.prod(shape) * dtype.itemsize for shape, dtype in values.values())
        + TARGET_LOGPROB_BYTES
    )
    grid = torch.empty(1, t.image_tokens, 1, device="meta")
    pooled = pool_image_features(grid, plan.pooling).shape[1]  # its errors name a pooling the grid rejects
    return CacheSize(
        token_bytes=per_token,
        tokens=plan.records * plan.answer_tokens,
        image_tokens=pooled,
        image_bytes=feature_codec.feature_bytes(pooled, t.hidden, plan.feature_encoding),
        images=math.ceil(plan.records / plan.records_per_image),
        records=plan.records,
    )
