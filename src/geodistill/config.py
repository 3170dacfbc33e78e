"""Typed configuration: one frozen dataclass per ``params.yaml`` section.

Every field has a docstring (the string under it), the loader rejects unknown keys, checks types,
runs each dataclass's ``problems()`` and reports every problem of the file in one ``ConfigError``.
A stage loads only the section(s) it reads, so ``dvc.yaml`` can list exactly those params.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from geodistill.errors import ConfigError

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class SyntheticConfig:
    seed: int = 0
    """Seed of the generator: the same seed gives byte-identical images and records."""
    image_size: int = 64
    """Side of the square scenes in pixels."""
    grid: int = 4
    """Cells per side; objects sit on cells. image_size/grid should equal the ViT patch size."""
    train_images: int = 1200
    """Training images (each yields ~8 records of all instruction types)."""
    val_images: int = 150
    """Validation images (same distribution; for tuning, never the test split)."""
    test_images: int = 150
    """Held-out test images for the four evaluation tasks."""
    pretrain_texts: int = 2000
    """Sentences in the text-only pretraining corpus D_PT."""

    def problems(self) -> list[str]:
        out = []
        if self.image_size % self.grid:
            out.append(f"image_size ({self.image_size}) must be a multiple of grid ({self.grid})")
        for name in ("train_images", "val_images", "test_images", "grid"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1")
        return out


@dataclass(frozen=True)
class GeoChatSourceConfig:
    train_json: str = ""
    """GeoChat_Instruct-style JSON list of records."""
    image_dir: str = ""
    """Folder the records' ``image`` paths are relative to."""
    pretrain_jsonl: str = ""
    """Optional text corpus for L_PT: JSONL with a ``text`` field per line (empty: none)."""
    val_fraction: float = 0.01
    """Share of images held out (by image, deterministic hash) as the validation split."""

    def problems(self) -> list[str]:
        return [] if 0 <= self.val_fraction < 1 else ["val_fraction must be in [0, 1)"]


@dataclass(frozen=True)
class DataConfig:
    source: Literal["synthetic", "geochat"] = "synthetic"
    """Where records come from: the embedded generator, or GeoChat-format JSON + images."""
    on_error: Literal["raise", "skip"] = "raise"
    """Bad records: raise an error naming file/record/field, or skip them and count them in the report."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Generator settings (used when source = synthetic)."""
    geochat: GeoChatSourceConfig = field(default_factory=GeoChatSourceConfig)
    """Real input (used when source = geochat)."""

    def problems(self) -> list[str]:
        if self.source == "geochat" and not (self.geochat.train_json and self.geochat.image_dir):
            return ["source 'geochat' needs geochat.train_json and geochat.image_dir"]
        return []


@dataclass(frozen=True)
class ShardConfig:
    maxcount: int = 512
    """Most samples (images) per tar shard."""
    maxsize: int = 64_000_000
    """Most bytes per tar shard."""

    def problems(self) -> list[str]:
        return [f"{k} must be >= 1" for k in ("maxcount", "maxsize") if getattr(self, k) < 1]


# --------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class LlavaArch:
    """A LLaVA-1.5 architecture: CLIP ViT tower, 2-layer MLP projector, Llama-family LLM.

    No size has a default of its own: the teacher's and the student's defaults are in their sections.
    """

    hidden_size: int
    """LLM width."""
    intermediate_size: int
    """LLM MLP width."""
    num_layers: int
    """LLM decoder layers."""
    num_heads: int
    """LLM attention heads."""
    num_kv_heads: int
    """LLM key/value heads (grouped-query attention when fewer than num_heads)."""
    vision_hidden_size: int
    """CLIP tower width."""
    vision_intermediate_size: int
    """CLIP MLP width."""
    vision_layers: int
    """CLIP layers (>= 3: the feature layer must be trained; docs/design.md)."""
    vision_heads: int
    """CLIP attention heads."""
    image_size: int
    """Input resolution of the tower (images are resized to it)."""
    patch_size: int
    """ViT patch size; image tokens = (image_size / patch_size)^2."""
    max_position_embeddings: int
    """Longest sequence, image tokens included."""
    projector: str = "mlp2x_gelu"
    """Projector type (LLaVA-1.5's linear-GELU-linear)."""
    vision_positions: Literal["clip", "sincos"] = "clip"
    """How a *built* tower's patch position embeddings start: clip (CLIP's init, std 0.02) or sincos
    (a 2-D sine-cosine table as strong as a patch's content; models.llava.init_patch_positions).
    Ignored for checkpoints, which bring their own."""
    init_std: float = 0.02
    """Std of the weight init of a *built* language model and projector (transformers'
    ``initializer_range``; Llama's 0.02; the tower keeps CLIP's). Ignored for checkpoints. From scratch,
    grounding is learnt only with a larger init and a lower lr (docs/design.md, "The embedded experiment")."""

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def problems(self) -> list[str]:
        out = []
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            out.append("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
        if self.vision_hidden_size % self.vision_heads:
            out.append("vision_hidden_size must divide by vision_heads")
        if self.image_size % self.patch_size:
            out.append("image_size must be a multiple of patch_size")
        if self.projector != "mlp2x_gelu":
            out.append(f"projector {self.projector!r} is not supported; use 'mlp2x_gelu'")
        if self.max_position_embeddings <= self.num_image_tokens:
            out.append("max_position_embeddings must exceed the number of image tokens")
        if not self.init_std > 0:
            out.append(f"init_std must be > 0, got {self.init_std}")
        return out


@dataclass(frozen=True)
class TokenizerConfig:
    source: Literal["build", "path"] = "build"
    """build: train a tokenizer offline on the prepared corpus; path: copy a checkpoint's tokenizer."""
    path: str = ""
    """Checkpoint or tokenizer folder (source = path)."""
    vocab_size: int = 1024
    """Target vocabulary size when building (special and coordinate tokens included)."""

    def problems(self) -> list[str]:
        if self.source == "path" and not self.path:
            return ["tokenizer.source 'path' needs tokenizer.path"]
        return (
            []
            if self.vocab_size >= 256
            else ["vocab_size must be >= 256 (specials, ASCII and box tokens take 209)"]
        )


Precision = Literal["fp32", "bf16", "fp16"]
"""Compute precision of a training loop or of the teacher pass. Training keeps float32 master weights and
optimizer state in every case (bf16/fp16 = autocast, or DeepSpeed's bf16/fp16 mode); fp16 needs a CUDA GPU
(loss scaling); bf16 runs on CPUs too, slowly (geodistill.distill.train, geodistill.cache.build)."""


@dataclass(frozen=True)
class TrainConfig:
    """One training loop's settings (SFT and distillation share the loop).

    The field defaults serve direct construction (tests); each params section that holds a loop
    (``teacher.train``, ``sft.train``, ``distill.train``) has its own default, equal to params.yaml.
    """

    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 32
    """Records per step (per process)."""
    lr: float = 1e-3
    """Peak learning rate (AdamW), linear warm-up then cosine decay."""
    warmup: int = 20
    """Warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 disables)."""
    seed: int = 0
    """Seed of initialisation-independent randomness: data order, dropout, sampling."""
    max_len: int = 256
    """Longest tokenised conversation; longer records are truncated (counted in the log)."""
    log_every: int = 10
    """Steps between logged metrics."""
    checkpoint_every: int = 0
    """Steps between resumable checkpoints (0: only at the end)."""
    max_nonfinite: int = 10
    """Non-finite losses skipped before the run aborts."""
    precision: Precision = "fp32"
    """Compute precision: fp32, or bf16/fp16 autocast over float32 master weights and optimizer state
    (DeepSpeed's bf16/fp16 mode under DeepSpeed). fp16 needs a CUDA GPU (dynamic loss scaling)."""
    length_group: int = 0
    """Batches per length-sorted group of the data stream (0: off): records are sorted by length within
    groups of this many batches, whose order is then shuffled, so a batch pads to similar lengths. The
    embedded teacher uses 8, the students' short runs 0: batches of one length are often of one task
    (docs/design.md, "Scale", has what it saves and costs)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward instead of keeping them: the language model's decoder layers,
    and the vision tower's when it trains (python -m geodistill.bench.memory measures the saving)."""

    def problems(self) -> list[str]:
        out = [
            f"{k} must be >= 1"
            for k in ("steps", "batch_size", "max_len", "log_every")
            if getattr(self, k) < 1
        ]
        if self.lr <= 0:
            out.append("lr must be > 0")
        if min(self.warmup, self.checkpoint_every, self.max_nonfinite, self.length_group) < 0:
            out.append("warmup, checkpoint_every, max_nonfinite and length_group must be >= 0")
        return out


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = False
    """Train LoRA adapters on the language model instead of all its weights."""
    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator."""
    dropout: float = 0.0
    """LoRA dropout."""
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    """Linear layers of the language model LoRA wraps (last name part, e.g. q_proj, down_proj)."""

    def problems(self) -> list[str]:
        return [] if self.targets else ["targets must name at least one layer (e.g. [q_proj, v_proj])"]


# The embedded default models of params.yaml: the teacher (LLM 256 x 4) clearly larger than the
# student (96 x 2); the same CLIP tower and 16 px patches on 64 px scenes (16 image tokens).
_TEACHER_ARCH = functools.partial(
    LlavaArch,
    hidden_size=256,
    intermediate_size=512,
    num_layers=4,
    num_heads=4,
    num_kv_heads=4,
    vision_hidden_size=64,
    vision_intermediate_size=128,
    vision_layers=3,
    vision_heads=4,
    image_size=64,
    patch_size=16,
    max_position_embeddings=512,
    vision_positions="sincos",
    init_std=0.0625,
)
_STUDENT_ARCH = functools.partial(
    _TEACHER_ARCH, hidden_size=96, intermediate_size=192, num_layers=2, init_std=0.1
)


@dataclass(frozen=True)
class TeacherConfig:
    source: Literal["train", "path"] = "train"
    """train: SFT a tiny teacher here (embedded default); path: adopt a local HF LLaVA checkpoint."""
    path: str = ""
    """Checkpoint folder (source = path)."""
    arch: LlavaArch = field(default_factory=_TEACHER_ARCH)
    """Architecture when training here."""
    train: TrainConfig = field(
        default_factory=functools.partial(
            TrainConfig, steps=1000, lr=5e-4, warmup=30, log_every=25, checkpoint_every=100, length_group=8
        )
    )
    """SFT settings when training here (the longest stage: resumable every 100 steps)."""

    def problems(self) -> list[str]:
        return ["teacher.source 'path' needs teacher.path"] if self.source == "path" and not self.path else []


Encoding = Literal["float32", "float16", "uint8_log"]
"""The top-k value encodings; what each stores and its error bound: geodistill.cache.codec (which takes its
ENCODINGS from here: a config that imported the codec would make every stage depend on cache/)."""

FeatureEncoding = Literal["float32", "float16", "int8"]
"""How the cache stores projector features; what each stores and its error bound:
geodistill.cache.feature_codec."""


@dataclass(frozen=True)
class CacheConfig:
    k: int = 16
    """Teacher top-k tokens stored per assistant token (plus an exact tail bucket)."""
    encoding: Encoding = "float16"
    """Value encoding of the top-k log-probs (see geodistill.cache.codec)."""
    pooling: int = 1
    """Average pooling of the projector features over the patch grid (kernel = stride)."""
    feature_encoding: FeatureEncoding = "float16"
    """Storage of the (pooled) projector features: float32, float16, or int8 with one float32 absmax scale
    per image token (geodistill.cache.feature_codec). float16 here: the embedded teacher's features are
    8 KB per image, so int8 would save nothing worth even its small error, and the cache stays what it was.
    At GeoChat-13B's shape int8 + pooling 3 (0.74 MB per image) loses less than float16 + pooling 4
    (0.83 MB): pooling, not int8, is the loss (`python -m geodistill.bench.features`)."""
    batch_size: int = 64
    """Records per teacher forward."""
    precision: Precision = "fp32"
    """Dtype of the teacher's weights and compute in the teacher pass (recorded in the cache fingerprint):
    fp32, or bf16/fp16 (fp16 needs a CUDA GPU)."""
    prefix_reuse: bool = True
    """Run the shared prefix of an image's records (system prompt, image tokens) once per image and only
    each record's rest after it (geodistill.cache.prefix); same content up to float32 noise, so not
    part of the cache fingerprint."""

    def problems(self) -> list[str]:
        return [f"{k} must be >= 1" for k in ("k", "pooling", "batch_size") if getattr(self, k) < 1]


@dataclass(frozen=True)
class StudentConfig:
    source: Literal["build", "path"] = "build"
    """build: a fresh student from ``arch``; path: start from a local HF LLaVA checkpoint."""
    path: str = ""
    """Checkpoint folder (source = path)."""
    arch: LlavaArch = field(default_factory=_STUDENT_ARCH)
    """Architecture when building."""
    init_seed: int = 0
    """Seed of the student's initial weights (baseline, control and KD share them)."""
    freeze_vision: bool = False
    """Freeze the CLIP tower, as GeoChat does (its CLIP is pretrained; the embedded towers start random)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Optional LoRA on the language model."""

    def problems(self) -> list[str]:
        return ["student.source 'path' needs student.path"] if self.source == "path" and not self.path else []


@dataclass(frozen=True)
class SftConfig:
    train: TrainConfig = field(
        default_factory=functools.partial(
            TrainConfig, steps=300, lr=5e-4, warmup=30, log_every=25, checkpoint_every=100
        )
    )
    """SFT of the baseline student on ground truth."""


@dataclass(frozen=True)
class OnPolicyConfig:
    enabled: bool = True
    """Add MiniLLM's on-policy terms (needs the live teacher); the paper's method has them on."""
    every: int = 4
    """Run an on-policy update every N steps."""
    batch_size: int = 8
    """Prompts sampled per on-policy update."""
    mix_alpha: float = 0.2
    """Teacher-mixed sampling: y_t ~ (1 - a) q + a p."""
    max_new_tokens: int = 32
    """Longest sampled response."""
    temperature: float = 1.0
    """Sampling temperature."""
    clip: float = 3.0
    """Cap on the per-token importance weight w_t (binds only at temperature != 1; see
    geodistill.distill.onpolicy.importance_weights)."""
    single_weight: float = 1.0
    """Weight of the single-step reverse-KL term on samples."""
    long_weight: float = 1.0
    """Weight of the long-term (policy-gradient) term."""

    def problems(self) -> list[str]:
        out = [] if 0 <= self.mix_alpha <= 1 else ["mix_alpha must be in [0, 1]"]
        return out + (
            [f"{k} must be >= 1" for k in ("every", "batch_size", "max_new_tokens") if getattr(self, k) < 1]
        )


@dataclass(frozen=True)
class DeepSpeedConfig:
    enabled: bool = False
    """Train under DeepSpeed (launch with `deepspeed` or `torchrun`)."""
    zero_stage: int = 2
    """ZeRO stage (0-3)."""
    offload: Literal["none", "optimizer", "all"] = "none"
    """ZeRO-Offload to CPU memory: none; optimizer (its state and step, stage >= 1); all (the parameters
    too, stage 3 only)."""

    def problems(self) -> list[str]:
        if self.zero_stage not in (0, 1, 2, 3):
            return ["zero_stage must be 0, 1, 2 or 3"]
        if self.offload == "optimizer" and self.zero_stage == 0:
            return ["offload 'optimizer' needs zero_stage >= 1"]
        if self.offload == "all" and self.zero_stage != 3:
            return ["offload 'all' (parameters too) needs zero_stage 3"]
        return []


Divergence = Literal["reverse", "forward", "jsd", "skew_forward", "skew_reverse"]
"""The divergence kinds; their functions are geodistill.distill.losses.DIVERGENCES (a test pins that the
two name the same kinds; defined here so that reading a config imports neither torch nor distill/)."""


@dataclass(frozen=True)
class DistillConfig:
    kl: Divergence = "reverse"
    """Divergence on cached data: reverse (the paper's), or one of the alternatives in ``Divergence``."""
    kl_weight: float = 1.0
    """Weight of the KL term on cached teacher top-k."""
    sft_weight: float = 1.0
    """Weight of plain cross-entropy on ground truth: 0 in the paper's recipe, 1 by default because the
    validation sweep (`python -m geodistill.exps sweep`) put it first."""
    align_weight: float = 1.0
    """Weight of L_align (projector-feature MSE)."""
    pt_weight: float = 0.1
    """Weight of L_PT (language modelling on D_PT)."""
    pt_batch_size: int = 8
    """Pretraining texts per step."""
    jsd_beta: float = 0.5
    """beta of JSD(beta)."""
    skew_alpha: float = 0.1
    """alpha of skew KL."""
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    """MiniLLM on-policy terms."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed ZeRO."""
    train: TrainConfig = field(
        default_factory=functools.partial(
            TrainConfig, steps=150, lr=5e-4, warmup=10, log_every=10, checkpoint_every=50
        )
    )
    """Loop settings (the equal-compute control uses the same steps and batch size)."""

    def problems(self) -> list[str]:
        if not 0 < self.jsd_beta < 1 or not 0 < self.skew_alpha < 1:
            return ["jsd_beta and skew_alpha must be in (0, 1)"]
        return []


# ----------------------------------------------------------------------------------------- evaluation


_SET_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def _set_name_problems(name: str) -> list[str]:
    if not _SET_NAME_RE.fullmatch(name):
        return [f"name {name!r} must be letters, digits, '_' or '-' (it names metric keys: scene/<name>_OA)"]
    return []


@dataclass(frozen=True)
class SceneSetConfig:
    """One scene-classification benchmark (AID, UCMerced): a folder of images per class."""

    name: str
    """The set's column in the report and its metric keys (``scene/<name>_OA``), e.g. aid, ucm."""
    dir: str
    """The dataset folder: ``<dir>/<class folder>/<image>``."""

    def problems(self) -> list[str]:
        return _set_name_problems(self.name) + ([] if self.dir else ["dir is empty (the dataset folder)"])


@dataclass(frozen=True)
class VqaSetConfig:
    """One RSVQA split (LR or HR test set)."""

    name: str
    """The set's column and metric keys (``vqa/<name>_mOA``), e.g. lr, hr."""
    dir: str
    """Folder with the split's ``<prefix>_questions.json``, ``_answers.json``, ``_images.json``."""
    prefix: str
    """Prefix of the split files, e.g. LR_split_test (RSVQA-LR), USGS_split_test_phili (HRBEN)."""
    image_dir: str = ""
    """Image folder (Images_LR / Data); empty: ``dir``."""

    def problems(self) -> list[str]:
        out = _set_name_problems(self.name)
        out += [] if self.dir else ["dir is empty (the folder of the RSVQA JSON files)"]
        return out + ([] if self.prefix else ["prefix is empty (e.g. LR_split_test)"])


@dataclass(frozen=True)
class BenchFileSetConfig:
    """One GeoChat-Bench file: referring/grounding JSONL or region-caption JSON(L), and its images."""

    name: str
    """The set's column and metric keys (``referring/<name>_acc@0.5``), e.g. geochat."""
    path: str
    """The benchmark file."""
    image_dir: str
    """Folder of its images (``<image_id>.png``)."""

    def problems(self) -> list[str]:
        out = _set_name_problems(self.name)
        return out + [f"{f} is empty" for f in ("path", "image_dir") if not getattr(self, f)]


def _duplicate_names(task: str, sets: tuple[Any, ...]) -> list[str]:
    names = [s.name for s in sets]
    dupes = sorted({n for n in names if names.count(n) > 1})
    return [f"{task}: set names {dupes} repeat; each set needs its own name"] if dupes else []


@dataclass(frozen=True)
class BenchmarksConfig:
    """Real benchmarks, several per task, each evaluated and reported as its own column. A task with no
    set here is evaluated on the prepared split's sets (the embedded benchmark writes its own)."""

    scene: tuple[SceneSetConfig, ...] = ()
    """Scene classification, evaluated zero-shot: e.g. ``[{name: aid, dir: ...}, {name: ucm, dir: ...}]``."""
    vqa: tuple[VqaSetConfig, ...] = ()
    """RSVQA splits: e.g. ``[{name: lr, dir: .., prefix: LR_split_test, image_dir: ..}, {name: hr, ..}]``."""
    referring: tuple[BenchFileSetConfig, ...] = ()
    """GeoChat-Bench referring/grounding JSONL files: ``[{name: geochat, path: ..., image_dir: ...}]``."""
    region_caption: tuple[BenchFileSetConfig, ...] = ()
    """GeoChat-Bench region-caption JSON files, same fields as ``referring``."""

    def problems(self) -> list[str]:
        out: list[str] = []
        for task in ("scene", "vqa", "referring", "region_caption"):
            out += _duplicate_names(task, getattr(self, task))
        return out


@dataclass(frozen=True)
class EvalConfig:
    split: Literal["test", "val"] = "test"
    """Prepared split to evaluate: test.jsonl, or val_eval.jsonl (tune on val, report on test)."""
    batch_size: int = 32
    """Prompts per batched greedy decode."""
    max_new_tokens: int = 48
    """Longest generated answer."""
    limit: int = 0
    """At most this many items per task (0: all)."""
    latency_samples: int = 16
    """Single-sample generations timed for latency."""
    on_error: Literal["raise", "skip"] = "raise"
    """Bad evaluation items (unreadable image, a path outside its folder, a malformed benchmark record):
    raise naming file/item/field, or skip them and list them in reports/eval/<model>/skipped.json."""
    benchmarks: BenchmarksConfig = field(default_factory=BenchmarksConfig)
    """Real benchmarks per task (a task's sets here replace the prepared split's sets of that task)."""


# ---------------------------------------------------------------------------------------------- loader


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str, errors: list[str], base: Any = None) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping, got {value!r}")
            return None
        return _build(tp, value, where, errors, base)
    if origin is Literal:
        if value not in typing.get_args(tp):
            errors.append(f"{where}: must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, where, errors)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            errors.append(f"{where}: expected a list, got {value!r}")
            return None
        (inner, *_) = typing.get_args(tp)
        return tuple(_convert(v, inner, f"{where}[{i}]", errors) for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        errors.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return None
    return value


def _default(f: dataclasses.Field) -> Any:
    """A field's default value (a fresh one from its factory), or MISSING for a required field."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _build(cls: type[T], data: dict[str, Any], where: str, errors: list[str], base: Any = None) -> T | None:
    """``cls`` from ``data`` over ``base`` (default: the field defaults); problems go to ``errors``.

    A nested mapping updates the enclosing field's default, so ``teacher: {train: {steps: 10}}`` keeps
    the rest of the teacher's own loop settings, not those of a bare ``TrainConfig()``.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in names:
            errors.append(f"{where}.{key}: unknown key (valid: {', '.join(sorted(names))})")
    kwargs = {}
    n_before = len(errors)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        default = _default(f) if base is None else getattr(base, f.name)
        if f.name in data:
            nested_base = default if dataclasses.is_dataclass(default) else None
            kwargs[f.name] = _convert(data[f.name], hints[f.name], f"{where}.{f.name}", errors, nested_base)
        elif default is dataclasses.MISSING:
            errors.append(f"{where}.{f.name}: missing (this field has no default)")
    if len(errors) > n_before:
        return None
    obj = cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)
    problems = getattr(obj, "problems", None)
    if problems is not None:
        errors.extend(f"{where}: {p}" for p in problems())
    return obj


def from_dict(cls: type[T], data: dict[str, Any] | None, section: str) -> T:
    """Build ``cls`` from a params mapping; raises one ConfigError listing every problem."""
    errors: list[str] = []
    obj = _build(cls, data or {}, section, errors)
    if errors or obj is None:
        raise ConfigError(f"invalid params section '{section}':\n  - " + "\n  - ".join(errors))
    return obj


#: params.yaml section -> its dataclass. The one place that maps sections to types.
SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "shard": ShardConfig,
    "tokenizer": TokenizerConfig,
    "teacher": TeacherConfig,
    "cache": CacheConfig,
    "student": StudentConfig,
    "sft": SftConfig,
    "distill": DistillConfig,
    "eval": EvalConfig,
}


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found; run from the project root (where params.yaml lives)")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def load_section(name: str, path: str | Path = "params.yaml") -> Any:
    """Load and validate one section of params.yaml."""
    if name not in SECTIONS:
        raise ConfigError(f"unknown params section {name!r}; sections are {sorted(SECTIONS)}")
    return from_dict(SECTIONS[name], read_params(path).get(name), name)


def load_all(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Validate the whole file: unknown sections and every section's problems in one error."""
    raw = read_params(path)
    errors = [
        f"{k}: unknown section (valid: {', '.join(sorted(SECTIONS))})" for k in raw if k not in SECTIONS
    ]
    out = {}
    for name, cls in SECTIONS.items():
        try:
            out[name] = from_dict(cls, raw.get(name), name)
        except ConfigError as e:
            errors.append(str(e))
    if errors:
        raise ConfigError(f"{path}:\n" + "\n".join(errors))
    return out
