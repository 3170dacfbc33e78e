"""The planner's inputs: a preset or params file, the params it sets, and every run assumption (RunPlan).

A preset (``presets/*.yaml``) has two sections: ``params:``, params.yaml sections that `dvc exp run` applies
(``override_args`` turns them into ``-S ++key=value`` arguments, Hydra's override syntax that DVC 3 parses
offline), and ``plan:``, what the planner assumes about the run (GPUs, throughput, data shape). Keys under
``params:`` that config.py does not define yet are reported as pending: read by the planner, never applied.
No torch here, so ``geodistill preset`` starts fast.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from geodistill.cache import codec
from geodistill.config import SECTIONS, CacheConfig, FeatureEncoding, Precision, from_dict, read_params
from geodistill.errors import ConfigError

PRECISION_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class RunPlan:
    """Every input of the arithmetic beside the two models. The fields without a default come from the
    params; a preset's ``plan:`` section overrides any field, ``geodistill plan`` flags (same names, ``-``
    for ``_``) override both."""

    precision: Precision
    """Distillation precision (``distill.train.precision``): bf16/fp16 = 16-bit weights + fp32 masters."""
    teacher_precision: Precision
    """Teacher-pass precision (``cache.precision``)."""
    zero: int
    """DeepSpeed ZeRO stage for distillation (0 when ``distill.deepspeed`` is off: plain data parallel)."""
    micro_batch: int
    """Records per GPU per forward in distillation (``distill.train.batch_size``)."""
    teacher_batch: int
    """Records per teacher forward (``cache.batch_size``)."""
    lora_r: int
    """LoRA rank on the student's LLM (``student.lora``); 0 trains the whole LLM."""
    lora_targets: tuple[str, ...]
    """Linear layers (last name part) LoRA wraps in each decoder layer."""
    lora_dropout: float
    """LoRA dropout (> 0 keeps each adapter's dropped input and mask for backward)."""
    freeze_vision: bool
    """CLIP tower frozen, as GeoChat does (``student.freeze_vision``)."""
    checkpointing: bool
    """Activation checkpointing of every decoder layer (``distill.train.gradient_checkpointing``)."""
    k: int
    """Cached top-k per token (``cache.k``)."""
    encoding: str
    """Top-k value encoding (``cache.encoding``)."""
    pooling: int
    """Average pooling of the cached projector features (``cache.pooling``)."""
    steps: int
    """Distillation optimizer steps (``distill.train.steps``)."""
    live_teacher: bool
    """On-policy terms (``distill.onpolicy.enabled``): the teacher sits in GPU memory during distillation."""
    vocab_size: int
    """Vocabulary of models built from ``arch`` (``tokenizer.vocab_size``; a checkpoint's config.json has
    its own)."""
    gpus: int = 1
    """GPUs (data-parallel ranks) for the teacher pass and for distillation."""
    gpu_memory_gib: float = 80.0
    """Memory of one GPU, to say whether a figure fits."""
    tflops: float = 100.0
    """Achieved TFLOP/s per GPU (FLOPs as counted here / wall time), not the peak."""
    records: int = 10000
    """Training records (instruction pairs) the teacher pass covers."""
    records_per_image: float = 1.0
    """Records per image (a shard sample's records; manifest totals.records / totals.samples)."""
    text_tokens: int = 150
    """Non-image tokens per record: system prompt, question, answer."""
    prefix_text_tokens: int = 40
    """Of the text tokens, those every record of an image shares before the image (system + ``USER: ``)."""
    answer_tokens: int = 60
    """Supervised tokens per record (the cache stores top-k for these)."""
    attention: Literal["sdpa", "eager"] = "sdpa"
    """sdpa keeps no T x T scores for backward; eager keeps the softmax output per head."""
    feature_encoding: FeatureEncoding = CacheConfig.feature_encoding
    """Cached feature values (``cache.feature_encoding``; bytes per image: cache.feature_codec)."""

    def problems(self) -> list[str]:
        out = [
            f"{k} must be >= 1"
            for k in (
                "micro_batch",
                "teacher_batch",
                "k",
                "pooling",
                "steps",
                "gpus",
                "records",
                "vocab_size",
            )
            if getattr(self, k) < 1
        ]
        if self.zero not in (0, 1, 2, 3):
            out.append("zero must be 0, 1, 2 or 3")
        if self.lora_r < 0 or not 0 <= self.lora_dropout < 1:
            out.append("lora_r must be >= 0 and lora_dropout in [0, 1)")
        if self.tflops <= 0 or self.gpu_memory_gib <= 0 or self.records_per_image < 1:
            out.append("tflops and gpu_memory_gib must be > 0, records_per_image >= 1")
        if (
            not 0 <= self.prefix_text_tokens <= self.text_tokens
            or not 1 <= self.answer_tokens <= self.text_tokens
        ):
            out.append("need 0 <= prefix_text_tokens <= text_tokens and 1 <= answer_tokens <= text_tokens")
        if self.encoding not in codec.ENCODINGS:
            out.append(f"encoding must be one of {codec.ENCODINGS}")
        return out


FIELDS = tuple(f.name for f in dataclasses.fields(RunPlan))


@dataclass(frozen=True)
class Preset:
    """A params file, or a preset: ``params:`` (params.yaml sections to apply) + ``plan:`` (assumptions)."""

    path: Path
    params: dict[str, Any]
    """Raw params sections, merged over the base params.yaml when one is given."""
    plan: dict[str, Any]
    """The ``plan:`` section (RunPlan fields)."""
    pending: tuple[str, ...]
    """Dotted keys of ``params`` that config.py does not define yet (not validated, not applied)."""


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = _merge(out[key], value) if both else value
    return out


def schema_unknown(raw: Mapping[str, Any], cls: type | None = None, prefix: str = "") -> list[str]:
    """Dotted keys of a params mapping that no config dataclass field defines (``cls`` None: sections)."""
    fields = dict(SECTIONS) if cls is None else typing.get_type_hints(cls)
    if cls is not None:
        fields = {f.name: fields[f.name] for f in dataclasses.fields(cls)}
    out = []
    for key, value in raw.items():
        if key not in fields:
            out.append(prefix + key)
        elif isinstance(value, Mapping) and dataclasses.is_dataclass(fields[key]):
            out += schema_unknown(value, fields[key], f"{prefix}{key}.")
    return out


def _without(raw: Mapping[str, Any], dotted: Sequence[str]) -> dict[str, Any]:
    """``raw`` without the dotted keys."""
    out = {}
    for key, value in raw.items():
        if key in dotted:
            continue
        inner = [d[len(key) + 1 :] for d in dotted if d.startswith(key + ".")]
        out[key] = _without(value, inner) if isinstance(value, Mapping) and inner else value
    return out


def read_preset(path: str | Path, base: str | Path | None = None) -> Preset:
    """A preset (``params:`` + ``plan:``) or a plain params file, merged over ``base`` when it exists."""
    path = Path(path)
    raw = read_params(path)
    if "params" in raw or "plan" in raw:
        extra = set(raw) - {"params", "plan"}
        if extra:
            raise ConfigError(
                f"{path}: a preset has only 'params:' and 'plan:' sections, found {sorted(extra)}"
            )
        params, plan = raw.get("params") or {}, raw.get("plan") or {}
    else:
        params, plan = raw, {}
    bad = sorted(set(plan) - set(FIELDS))
    if bad:
        raise ConfigError(f"{path}: plan.{bad[0]}: unknown (valid: {', '.join(FIELDS)})")
    pending = schema_unknown(params)
    if base is not None and Path(base).is_file():
        params = _merge(read_params(base), params)
    return Preset(path, params, plan, tuple(pending))


def sections(preset: Preset) -> dict[str, Any]:
    """Every params section, typed and validated (pending keys left out); all problems at once."""
    known = _without(preset.params, schema_unknown(preset.params))
    out, errors = {}, []
    for name in SECTIONS:
        try:
            out[name] = from_dict(SECTIONS[name], known.get(name), name)
        except ConfigError as e:
            errors.append(str(e))
    if errors:
        raise ConfigError(f"{preset.path}:\n" + "\n".join(errors))
    return out


def run_plan(preset: Preset, flags: Mapping[str, Any]) -> tuple[RunPlan, dict[str, Any]]:
    """RunPlan from the params, the preset's ``plan:`` and the flags (None = not given), and the typed
    sections."""
    typed = sections(preset)
    student, cache, distill = typed["student"], typed["cache"], typed["distill"]
    derived = {
        "precision": distill.train.precision,
        "teacher_precision": cache.precision,
        "zero": distill.deepspeed.zero_stage if distill.deepspeed.enabled else 0,
        "micro_batch": distill.train.batch_size,
        "teacher_batch": cache.batch_size,
        "lora_r": student.lora.r if student.lora.enabled else 0,
        "lora_targets": list(student.lora.targets),
        "lora_dropout": student.lora.dropout,
        "freeze_vision": student.freeze_vision,
        "checkpointing": distill.train.gradient_checkpointing,
        "k": cache.k,
        "encoding": cache.encoding,
        "pooling": cache.pooling,
        "feature_encoding": cache.feature_encoding,
        "steps": distill.train.steps,
        "live_teacher": distill.onpolicy.enabled,
        "vocab_size": typed["tokenizer"].vocab_size,
    }
    values = {**derived, **preset.plan, **{k: v for k, v in flags.items() if v is not None}}
    return from_dict(RunPlan, values, "plan"), typed


# --------------------------------------------------------------------------------- preset -> dvc


def _hydra_value(value: Any) -> str:
    """``value`` in Hydra's override grammar (what `dvc exp run -S` parses)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    text = str(value)
    if re.fullmatch(r"[A-Za-z0-9_./-]+", text) and yaml.safe_load(text) == text:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _leaves(raw: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in raw.items():
        if isinstance(value, Mapping):
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append((prefix + key, value))
    return out


def override_args(preset: Preset) -> list[str]:
    """``-S ++key=value`` for every value under the preset's ``params:`` that config.py knows (``++`` adds
    keys params.yaml lacks and overrides the others)."""
    pending = set(preset.pending)
    skip = [k for k, _ in _leaves(preset.params) if any(k == p or k.startswith(p + ".") for p in pending)]
    return [f"-S ++{k}={_hydra_value(v)}" for k, v in _leaves(preset.params) if k not in skip]
