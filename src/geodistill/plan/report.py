"""The printed plan: both models built on the meta device, the arithmetic, and what each figure assumes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from geodistill.cache import codec
from geodistill.markdown import table
from geodistill.plan.arithmetic import (
    cache_size,
    lora_macs,
    lora_params,
    sample_flops,
    teacher_memory,
    teacher_pass_flops,
    train_flops,
    train_memory,
    trainable_params,
)
from geodistill.plan.inputs import Preset, RunPlan, run_plan
from geodistill.plan.shapes import (
    PARTS,
    TABLE8_PARTS,
    TABLE8_VOCAB,
    ModelShape,
    meta_llava,
    model_config,
    shape_of,
)

_GIB = 2**30
HEADROOM = 0.9
"""Share of a GPU's memory a plan may fill: the rest is CUDA context, fragmentation, communication buckets."""


@dataclass(frozen=True)
class Plan:
    """Everything ``render`` prints: the inputs and the two models."""

    preset: Preset
    run: RunPlan
    teacher: ModelShape
    student: ModelShape


def build_plan(preset: Preset, flags: Mapping[str, Any]) -> Plan:
    """Read the inputs and build both models on the meta device."""
    run, typed = run_plan(preset, flags)
    shapes = []
    for name in ("teacher", "student"):
        cfg = typed[name]
        config, source = model_config(cfg.source, cfg.path, cfg.arch, run.vocab_size)
        shapes.append(shape_of(meta_llava(config), name, source))
    return Plan(preset, run, *shapes)


def _m(n: float) -> str:
    return f"{n / 1e6:,.2f}"


def _g(flops: float) -> str:
    return f"{flops / 1e9:,.1f}"


def _gib(nbytes: float) -> str:
    return f"{nbytes / _GIB:,.1f}"


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def fits(total_bytes: float, run: RunPlan) -> bool:
    """Whether ``total_bytes`` stays within HEADROOM of one GPU's memory."""
    return total_bytes <= HEADROOM * run.gpu_memory_gib * _GIB


def _llm_mode(run: RunPlan) -> str:
    return f"LoRA r={run.lora_r}" if run.lora_r else "full LLM"


def _params_section(p: Plan) -> list[str]:
    run, s = p.run, p.student
    tower = "frozen" if run.freeze_vision else "yes"
    llm = "frozen (LoRA)" if run.lora_r else "yes"
    adapters = f"{_llm_mode(run)} on {', '.join(run.lora_targets)}: +{_m(lora_params(s, run))} M"
    trains = {
        "vision tower": tower,
        "position embeddings": tower,
        "projector": "yes",
        "LLM decoder": adapters if run.lora_r else "yes",
    }
    rows = [[part, _m(p.teacher.params[part]), _m(s.params[part]), trains.get(part, llm)] for part in PARTS]
    trainable = f"{_m(trainable_params(s, run))} M trainable"
    rows.append(["**total**", _m(p.teacher.total), _m(s.total), trainable])
    table8 = [sum(m.params[k] for k in TABLE8_PARTS) for m in (p.teacher, s)]
    rows.append(["LLM + projector + position embeddings", _m(table8[0]), _m(table8[1]), "(Table 8's parts)"])
    return [
        "## Parameters (M)",
        "",
        table(["part", "teacher", "student", "student trains"], rows),
        "",
        f"Assumes: the teacher is frozen. Position embeddings: {s.vision_tokens:,} rows (patches + CLS). The "
        "paper's Table 8 (GeoChat-7B 6,760.72 M, GeoChat-13B 13,048.66 M) counts the last row's parts at "
        f"Llama's {TABLE8_VOCAB:,}-token vocabulary: GeoChat re-creates CLIP's position embedding after "
        "freezing the tower, which leaves it trainable by flag. Each vocabulary row more (the converter's "
        f"<image>) adds 2 x hidden. Checkpoints in 16-bit: teacher {2 * p.teacher.total / 1e9:.1f} GB, "
        f"student {2 * s.total / 1e9:.1f} GB (2 B per parameter: a weight index's total_size, less buffers).",
    ]


def _flops_section(p: Plan) -> list[str]:
    run, t, s = p.run, p.teacher, p.student
    fwd = [sample_flops(t, run), sample_flops(s, run, lora_macs(s, run))]
    names = {
        "vision": f"vision tower ({t.vision_tokens:,} tokens x {t.vision_layers} layers)",
        "projector": "projector",
        "linear": "LLM linear layers (LoRA included)",
        "attention": "LLM attention QK^T, AV (the T^2 term)",
        "lm_head": "lm_head (every position)",
    }
    rows = [[label, *(_g(getattr(f, key)) for f in fwd)] for key, label in names.items()]
    rows.append(["**forward**", *(f"**{_g(f.total)}**" for f in fwd)])
    train = train_flops(s, run)
    return [
        f"## FLOPs per record (GFLOP; T = {t.image_tokens:,} image + {run.text_tokens} text tokens)",
        "",
        table(["part", "teacher forward", "student forward"], rows),
        "",
        f"Student training, per record: **{_g(train)} GFLOP** = {train / fwd[1].total:.2f} x its forward "
        f"({_llm_mode(run)}, tower {'frozen' if run.freeze_vision else 'trained'}, checkpointing "
        f"{_on(run.checkpointing)}).",
        "",
        "Assumes: matmul FLOPs only, 2 per multiply-add; attention dense over T x T (causal kernels skip "
        "~half); backward = 1x forward per matmul a gradient passes + 1x per trained weight, 2x for "
        "attention; checkpointing recomputes the decoder's forward. The teacher costs nothing in "
        "distillation (cached) unless on-policy terms run it.",
    ]


def _memory_table(parts: list[dict[str, float]], headers: list[str], run: RunPlan) -> str:
    keys = list(dict.fromkeys(k for d in parts for k in d))
    rows = [[k, *(_gib(d[k]) if k in d else "-" for d in parts)] for k in keys]
    totals = [sum(d.values()) for d in parts]
    verdicts = [f"**{_gib(x)}** ({'fits' if fits(x, run) else 'does NOT fit'})" for x in totals]
    rows.append(["**total**", *verdicts])
    return table(headers, rows)


def _memory_section(p: Plan) -> list[str]:
    run, t, s = p.run, p.teacher, p.student
    teach = [teacher_memory(t, run, reuse=False), teacher_memory(t, run, reuse=True)]
    train = train_memory(s, run, t if run.live_teacher else None)
    mixed = " mixed" if run.precision != "fp32" else ""
    return [
        f"## Memory per GPU (GiB; fits = within {HEADROOM:.0%} of {run.gpu_memory_gib:g} GiB)",
        "",
        f"Teacher pass: {run.teacher_precision}, {run.teacher_batch} records per forward, {run.attention}.",
        "",
        _memory_table(teach, ["", "plain", "prefix reuse"], run),
        "",
        f"Distillation: {run.precision}{mixed}, {_llm_mode(run)}, ZeRO-{run.zero} over {run.gpus} GPU(s), "
        f"checkpointing {_on(run.checkpointing)}, micro-batch {run.micro_batch}, {run.attention}.",
        "",
        _memory_table([train], ["", "per GPU"], run),
        "",
        "Assumes: every record at the stated length (batches pad to their longest: plan with a larger "
        "--text-tokens to see that). Trainable parameters 16 B each (bf16/fp16: 16-bit weight and "
        "gradient, fp32 master and 2 AdamW moments; fp32: weight, gradient, 2 moments), frozen ones their "
        "dtype; ZeRO-1 shards optimizer states, -2 also gradients, -3 also all weights (+ the largest "
        "module, gathered). "
        "Activations: what the decoder layers keep for backward (checkpointing: each layer's input + one "
        "layer recomputed); teacher pass: one layer's tensors at a time. Logits at every position + fp32 "
        "log-probs at the supervised tokens. Not counted: CUDA context, allocator fragmentation, "
        "communication buckets (the headroom).",
    ]


def _cache_section(p: Plan) -> list[str]:
    run, t = p.run, p.teacher
    c = cache_size(t, run)
    topk = f"top-k (k={run.k}, {run.encoding}, {codec.id_dtype(t.vocab).name} ids, float32 target log-prob)"
    feats = f"features ({c.image_tokens} tokens x {t.hidden}, {run.feature_encoding}, pooling {run.pooling})"
    tokens, features = c.total_tokens_bytes, c.total_features_bytes
    rows = [
        [topk, f"{c.token_bytes} B/token", f"{c.tokens:,} tokens", f"{tokens / 1e9:,.2f}"],
        [feats, f"{c.image_bytes / 1e6:.2f} MB/image", f"{c.images:,} images", f"{features / 1e9:,.1f}"],
        ["**total**", "", "", f"**{(tokens + features) / 1e9:,.1f}**"],
    ]
    return [
        "## Teacher cache on disk (GB, uncompressed)",
        "",
        table(["array", "unit", "count", "GB"], rows),
        "",
        f"Assumes: {run.records:,} records x {run.answer_tokens} supervised tokens, records per image: "
        f"{run.records_per_image:g}; int8 features carry one fp32 scale per token. zstd "
        "shrinks the top-k arrays ~1.5x.",
    ]


def _time_section(p: Plan) -> list[str]:
    run, t, s = p.run, p.teacher, p.student
    rate = run.tflops * 1e12 * run.gpus
    plain, reuse = teacher_pass_flops(t, run)
    distill = run.steps * run.micro_batch * run.gpus * train_flops(s, run)
    rows = [
        [label, f"{flops / 1e15:,.0f}", f"{flops / rate / 3600:,.1f}"]
        for label, flops in (
            ("teacher pass, plain", plain),
            (f"teacher pass, prefix reuse ({reuse / plain:.2f} x plain)", reuse),
            (f"distillation: {run.steps:,} steps x {run.micro_batch * run.gpus} records", distill),
        )
    ]
    return [
        f"## Time at {run.tflops:g} TFLOP/s achieved per GPU, {run.gpus} GPU(s)",
        "",
        table(["", "PFLOP", "hours"], rows),
        "",
        f"Assumes: hours = FLOPs / (GPUs x achieved TFLOP/s). Prefix reuse: the records of an image "
        f"({run.records_per_image:g} on average) share {t.image_tokens:,} image + {run.prefix_text_tokens} "
        "text tokens, computed once per image. Not counted: data loading, cache writes, on-policy "
        "sampling and live-teacher scoring.",
    ]


def render(p: Plan) -> str:
    """The plan as markdown."""
    lines = [f"# geodistill plan: {p.preset.path}", ""]
    lines += [f"- {m.name}: {m.source}" for m in (p.teacher, p.student)]
    if p.preset.pending:
        lines.append(
            "- read from the file but not in the params schema (config.py) yet, so `geodistill preset` "
            "leaves them out: " + ", ".join(p.preset.pending)
        )
    for section in (_params_section, _flops_section, _memory_section, _cache_section, _time_section):
        lines += ["", *section(p)]
    return "\n".join(lines) + "\n"
