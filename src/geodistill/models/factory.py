"""Teacher and student LLaVA models: built from an architecture, loaded from / saved to local HF checkpoints.

A model is a transformers ``LlavaForConditionalGeneration`` (CLIP ViT tower, LLaVA-1.5's
linear-GELU-linear projector, Llama decoder). Conventions every stage relies on:

- the model's vocabulary equals ``len(tokenizer)`` and ``config.image_token_id`` is the tokenizer's
  ``<image>`` id; ``input_ids`` carry one ``<image>`` per image token (the template expands it);
- image tokens per image = ``num_image_tokens(config)``: (image_size / patch_size)^2 with the CLS
  token dropped (``vision_feature_select_strategy="default"``, LLaVA-1.5's "patch" features);
- built models read the *last* CLIP layer (``vision_feature_layer=-1``) so every tower layer is trained
  and used (with LLaVA's -2 a small tower wastes its last layer; DESIGN.md). Converted GeoChat
  checkpoints keep their -2. CLIP's ``post_layernorm`` only feeds the pooled CLS output, which LLaVA
  never uses: under DDP freeze the tower or pass ``find_unused_parameters=True``.

Everything loads from local files only (``local_files_only``, no remote code, safetensors only).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
)

# One definition of the architecture: the params.yaml dataclass (fields documented and validated there).
from geodistill.config import LlavaArch
from geodistill.errors import ModelError
from geodistill.models.tokenizer import image_token_id, load_tokenizer, tokenizer_hash

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "VISION_FEATURE_LAYER",
    "ImageTransform",
    "LlavaArch",
    "ProjectorCapture",
    "apply_lora",
    "build_llava",
    "capture_projector",
    "check_checkpoint",
    "check_compatible",
    "count_parameters",
    "ensure_offline",
    "freeze_vision_tower",
    "llava_config",
    "load_llava",
    "merge_lora",
    "num_image_tokens",
    "projector_features",
    "save_llava",
    "unwrap",
    "weights_hash",
]

VISION_FEATURE_LAYER = -1
"""CLIP layer whose output feeds the projector in built models (every layer trained and used)."""
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""OpenAI CLIP's normalisation mean (LLaVA-1.5 and GeoChat use it)."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""OpenAI CLIP's normalisation std."""
PREPROCESSOR_FILE = "preprocessor_config.json"


def ensure_offline() -> None:
    """Never touch the network (also passed as ``local_files_only`` on every load)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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
    _set_generation_ids(model, tokenizer)
    return model


def _set_generation_ids(model: LlavaForConditionalGeneration, tok: PreTrainedTokenizerBase) -> None:
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )


def num_image_tokens(config_or_model: LlavaConfig | nn.Module) -> int:
    """Image tokens per image the model expects in ``input_ids``."""
    cfg = config_or_model if isinstance(config_or_model, LlavaConfig) else unwrap(config_or_model).config
    n = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    return n + (1 if cfg.vision_feature_select_strategy == "full" else 0)


# ----------------------------------------------------------------------------------------- images


def _triple(values: Any, name: str) -> tuple[float, float, float]:
    vals = tuple(float(v) for v in (values if isinstance(values, list | tuple) else [values] * 3))
    if len(vals) != 3:
        raise ModelError(f"{PREPROCESSOR_FILE}: {name} must have 3 values (RGB), got {values!r}")
    return vals  # type: ignore[return-value]


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> normalised (3, size, size) float tensor, as CLIP / GeoChat preprocess.

    GeoChat resizes the shortest edge to the tower's size (bicubic) and centre-crops a square (its
    evaluation scripts call the CLIP processor with ``size=crop_size=504``); for the square scenes of
    remote sensing this is a plain square resize.
    """

    size: int
    """Side of the square input of the vision tower (the tower's ``image_size``)."""
    mean: tuple[float, float, float] = CLIP_MEAN
    """Per-channel mean subtracted after scaling to [0, 1]."""
    std: tuple[float, float, float] = CLIP_STD
    """Per-channel std divided by after subtracting the mean."""
    pad_to_square: bool = False
    """LLaVA-1.5's ``image_aspect_ratio: pad``: pad to a square with the mean colour before resizing
    (keeps the whole of a non-square image instead of cropping its long side)."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """(3, size, size) float32."""
        img = image.convert("RGB")
        if self.pad_to_square and img.width != img.height:
            side = max(img.width, img.height)
            fill = tuple(round(m * 255) for m in self.mean)
            canvas = Image.new("RGB", (side, side), fill)
            canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
            img = canvas
        w, h = img.size
        if (w, h) != (self.size, self.size):
            # Shortest edge -> size, keeping the aspect ratio (CLIP's rule), then a centre crop.
            short, long = min(w, h), max(w, h)
            new_long = int(self.size * long / short)
            new = (self.size, new_long) if w <= h else (new_long, self.size)
            img = img.resize(new, Image.Resampling.BICUBIC)
            left, top = (img.width - self.size) // 2, (img.height - self.size) // 2
            img = img.crop((left, top, left + self.size, top + self.size))
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(self.size, self.size, 3)
        x = x.permute(2, 0, 1).float().div_(255.0)  # (3, H, W) in [0, 1]
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def batch(self, images: Iterable[Image.Image]) -> torch.Tensor:
        """(B, 3, size, size) float32."""
        return torch.stack([self(im) for im in images])

    def to_preprocessor_config(self) -> dict[str, Any]:
        """A ``CLIPImageProcessor``-style ``preprocessor_config.json`` describing this transform."""
        cfg: dict[str, Any] = {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": self.size},
            "resample": 3,  # PIL bicubic
            "do_center_crop": True,
            "crop_size": {"height": self.size, "width": self.size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "do_convert_rgb": True,
        }
        if self.pad_to_square:
            cfg["image_aspect_ratio"] = "pad"
        return cfg

    def save(self, path: str | Path) -> None:
        """Write ``preprocessor_config.json`` into the folder ``path``."""
        (Path(path) / PREPROCESSOR_FILE).write_text(
            json.dumps(self.to_preprocessor_config(), indent=2) + "\n"
        )

    @classmethod
    def from_dir(cls, path: str | Path, size: int) -> ImageTransform:
        """The transform of a checkpoint folder: mean/std (and pad mode) from its preprocessor config when
        present, else CLIP's. ``size`` is the tower's ``image_size``, which wins over the file's crop size
        (GeoChat ships a 336 px CLIP processor but runs its tower at 504 px)."""
        file = Path(path) / PREPROCESSOR_FILE
        if not file.is_file():
            return cls(size)
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ModelError(
                f"{file}: not valid JSON ({e}); fix or delete it (CLIP defaults are used then)"
            ) from e
        return cls(
            size,
            _triple(raw.get("image_mean", CLIP_MEAN), "image_mean"),
            _triple(raw.get("image_std", CLIP_STD), "image_std"),
            raw.get("image_aspect_ratio") == "pad",
        )


# ------------------------------------------------------------------------------------ load / save


def check_checkpoint(path: str | Path) -> tuple[LlavaConfig, PreTrainedTokenizerBase]:
    """Validate a local HF-format LLaVA checkpoint without loading its weights (cheap even at 13B):
    the folder, config.json, safetensors files, tokenizer, vocabulary size and ``<image>`` id.
    Returns its config and tokenizer; raises ModelError naming the problem and the fix."""
    ensure_offline()
    p = Path(path)
    if not p.is_dir():
        raise ModelError(
            f"{p}: checkpoint folder does not exist; point the path at a local HF-format LLaVA checkpoint "
            "(config.json, *.safetensors, tokenizer files)"
        )
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"{p}: no config.json, so this is not a Hugging Face checkpoint folder")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_file}: not valid JSON ({e})") from e
    if "mm_vision_tower" in raw or "mm_hidden_size" in raw:
        raise ModelError(
            f"{p}: this is an original GeoChat/LLaVA checkpoint (config has mm_vision_tower); convert it "
            f"first: python -m geodistill.models.convert {p} <dst>"
        )
    if raw.get("model_type") != "llava":
        raise ModelError(
            f"{p}: model_type is {raw.get('model_type')!r}, not 'llava'; only LlavaForConditionalGeneration "
            "checkpoints are supported"
        )
    if not any(p.glob("*.safetensors")):
        raise ModelError(
            f"{p}: no *.safetensors weights (pickled .bin files are never loaded); re-save the model with "
            "save_pretrained() or run python -m geodistill.models.convert on the original checkpoint"
        )
    try:
        config = LlavaConfig.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"{cfg_file}: not a valid LLaVA config ({e})") from e
    tok = load_tokenizer(p)
    vocab = config.text_config.vocab_size
    if vocab != len(tok):
        raise ModelError(
            f"{p}: the model's vocabulary ({vocab}) differs from the tokenizer's size ({len(tok)}); save the "
            "tokenizer that belongs to these weights, or resize the embeddings to len(tokenizer) and re-save"
        )
    if config.image_token_id != image_token_id(tok):
        raise ModelError(
            f"{p}: config.image_token_index={config.image_token_id} but the tokenizer's <image> id is "
            f"{image_token_id(tok)}; fix image_token_index in config.json"
        )
    return config, tok


def load_llava(
    path: str | Path, *, dtype: torch.dtype | str | None = None
) -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerBase, ImageTransform]:
    """Model (eval mode), tokenizer and image transform of a local HF-format LLaVA checkpoint.

    ``dtype``: None keeps the checkpoint's dtype (transformers 5 loads "auto"); pass ``torch.float32``
    to train on CPU. Raises ModelError naming the problem and the fix (see ``check_checkpoint``).
    """
    p = Path(path)
    config, tok = check_checkpoint(p)
    try:
        model, info = LlavaForConditionalGeneration.from_pretrained(
            str(p),
            config=config,
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=True,
            dtype=dtype if dtype is not None else "auto",
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"{p}: cannot load the LLaVA weights ({e})") from e
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if bad:
        # transformers would silently initialise these at random: refuse instead.
        detail = "; ".join(f"{k}: {sorted(map(str, v))[:5]}" for k, v in bad.items())
        raise ModelError(
            f"{p}: the weights do not match config.json ({detail}); the checkpoint is incomplete"
        )
    if model.get_input_embeddings().num_embeddings != len(tok):
        raise ModelError(
            f"{p}: embed_tokens has {model.get_input_embeddings().num_embeddings} rows but the tokenizer "
            f"{len(tok)} tokens; the checkpoint's config.json and weights disagree"
        )
    _set_generation_ids(model, tok)
    return model, tok, ImageTransform.from_dir(p, config.vision_config.image_size)


def save_llava(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, image_transform: ImageTransform, path: str | Path
) -> None:
    """Write weights (safetensors), config, tokenizer and preprocessor config to ``path`` atomically.

    Everything is written to a temporary sibling folder that replaces ``path`` only when complete, so a
    crash never leaves a half-written checkpoint where a stage (or DVC) expects a whole one.
    """
    if _is_peft(model):
        raise ModelError("the model still has LoRA adapters; merge them first: model = merge_lora(model)")
    base = unwrap(model)
    rows = base.get_input_embeddings().num_embeddings
    if rows != len(tokenizer):
        raise ModelError(
            f"model vocabulary {rows} != len(tokenizer) {len(tokenizer)}; save the matching tokenizer"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        base.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        image_transform.save(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` to ``dst``, replacing any old ``dst`` (rename, then delete)."""
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------- compatibility


def check_compatible(teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase) -> None:
    """Raise ModelError naming what differs when teacher and student do not share one tokenizer.

    Distillation compares the two next-token distributions id by id (and the cache stores teacher
    token ids), so the vocabularies must be identical, not merely the same size.
    """
    diffs = []
    if len(teacher_tok) != len(student_tok):
        diffs.append(f"vocabulary size {len(teacher_tok)} (teacher) vs {len(student_tok)} (student)")
    for role in ("bos", "eos", "pad", "unk"):
        a, b = getattr(teacher_tok, f"{role}_token_id"), getattr(student_tok, f"{role}_token_id")
        if a != b:
            diffs.append(f"{role} id {a} vs {b}")
    try:
        ia, ib = image_token_id(teacher_tok), image_token_id(student_tok)
        if ia != ib:
            diffs.append(f"<image> id {ia} vs {ib}")
    except ModelError as e:
        diffs.append(str(e))
    ha, hb = tokenizer_hash(teacher_tok), tokenizer_hash(student_tok)
    if ha != hb:
        va, vb = teacher_tok.get_vocab(), student_tok.get_vocab()
        moved = sorted(t for t in va.keys() & vb.keys() if va[t] != vb[t])[:3]
        only = sorted(va.keys() ^ vb.keys())[:3]
        detail = f"tokenizer hash {ha[:12]} vs {hb[:12]}"
        if moved:
            detail += f"; tokens with other ids: {moved}"
        if only:
            detail += f"; tokens in only one vocabulary: {only}"
        diffs.append(detail)
    if diffs:
        raise ModelError(
            "teacher and student tokenizers differ: "
            + "; ".join(diffs)
            + ". The student must use the teacher's tokenizer (build the student from it)"
        )


# -------------------------------------------------------------------------------- training helpers


def _is_peft(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def unwrap(model: nn.Module) -> LlavaForConditionalGeneration:
    """The ``LlavaForConditionalGeneration`` inside DDP / DeepSpeed (``.module``) and peft wrappers."""
    m = model
    for _ in range(4):  # wrappers nest at most a few deep (DeepSpeed(DDP(Peft(model))))
        if isinstance(m, LlavaForConditionalGeneration):
            return m
        if _is_peft(m):
            m = m.get_base_model()  # type: ignore[operator]
        elif isinstance(getattr(m, "module", None), nn.Module):
            m = m.module  # type: ignore[assignment]
        else:
            break
    raise ModelError(
        f"expected a LlavaForConditionalGeneration (possibly wrapped), got {type(model).__name__}"
    )


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
    targets: Sequence[str] = ("q_proj", "v_proj"),
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


def merge_lora(model: nn.Module) -> LlavaForConditionalGeneration:
    """Fold LoRA adapters into the base weights (for export); a model without adapters is returned as is."""
    if _is_peft(model):
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


# ------------------------------------------------------------------------------------ fingerprints


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())  # works for every dtype, bf16 included


def weights_hash(model_or_dir: nn.Module | str | Path) -> str:
    """sha256 fingerprint of a model's weights.

    A folder: its ``*.safetensors`` files (name + bytes, sorted by name), streamed without loading.
    A module: every state_dict tensor in key order (key, dtype, shape, bytes). The two forms are
    different fingerprints of the same weights: compare like with like (the cache uses the folder's).
    """
    h = hashlib.sha256()
    if isinstance(model_or_dir, str | Path):
        folder = Path(model_or_dir)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{folder}: no *.safetensors files to fingerprint")
        for f in files:
            h.update(f.name.encode() + b"\0")
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
        return h.hexdigest()
    for key, t in model_or_dir.state_dict().items():
        if t.is_meta:
            raise ModelError(f"cannot fingerprint {key}: it is on the meta device (weights not loaded)")
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\0".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


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
