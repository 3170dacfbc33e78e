"""Checkpoint I/O: where a model lives, the one way to load it for inference and for training, saving.

A model folder is any of

- a pipeline model trained here (``models/<name>``: an HF checkpoint plus ``fingerprint.json``);
- an adopted checkpoint: ``models/<name>/adopted.json`` = {"path", "weights_sha256", "tokenizer_sha256"}
  (adopting a 13B checkpoint must not copy 26 GB into ``models/`` and the DVC cache);
- any local HF-format ``LlavaForConditionalGeneration`` checkpoint folder.

Two loaders, one per use, each with its precision decided here and nowhere else:

- :func:`load_for_inference` (chat, evaluation, the teacher cache): eval mode, gradients off, on the GPU
  when there is one, in :func:`inference_dtype`. Chat and evaluation therefore answer with the same
  numbers.
- :func:`load_for_training` (students, and the on-policy teacher that runs beside them): float32 master
  weights on the CPU; the training loop (or DeepSpeed) places them and decides any mixed precision.

Everything loads from local files only (``local_files_only``, no remote code, safetensors only).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerBase

from geodistill.config import Precision
from geodistill.errors import ConfigError, ModelError
from geodistill.files import atomic_dir
from geodistill.models.llava import ATTENTION, is_peft, set_generation_ids, unwrap
from geodistill.models.tokenizer import image_token_id, load_tokenizer, tokenizer_hash
from geodistill.models.transform import ImageTransform

ADOPTED = "adopted.json"
FINGERPRINT = "fingerprint.json"
TRAINING_DTYPE = torch.float32
"""Master weights of a model being trained (optimizer updates in bf16/fp16 would lose small steps)."""
PRECISIONS: dict[Precision, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
"""The dtype of each ``precision`` param value (``train.precision``, ``cache.precision``)."""

Loaded = tuple[LlavaForConditionalGeneration, PreTrainedTokenizerBase, ImageTransform]


def ensure_offline() -> None:
    """Never touch the network (also passed as ``local_files_only`` on every load)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# ------------------------------------------------------------------------------------------ where


def _pointer(model_dir: Path) -> dict[str, str] | None:
    """The adopted-model pointer of ``model_dir``, None when it is not an adopted model."""
    file = model_dir / ADOPTED
    if not file.exists():
        return None
    try:
        info = json.loads(file.read_text())
        if not isinstance(info, dict) or not isinstance(info["path"], str):
            raise TypeError("expected an object with a string 'path'")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ModelError(
            f"{file} is not a valid adopted-model pointer ({type(e).__name__}: {e}); "
            "re-run the stage that adopted it"
        ) from e
    return info


def resolve(model_dir: str | Path) -> Path:
    """The folder that holds the weights of a model folder (itself, or the checkpoint it adopted)."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise ModelError(
            f"{model_dir}: no such model folder; pass models/<name> or a local HF-format LLaVA checkpoint"
        )
    pointer = _pointer(model_dir)
    return model_dir if pointer is None else Path(pointer["path"])


# ------------------------------------------------------------------------------------------- load


def inference_dtype(device: torch.device) -> torch.dtype:
    """The one precision every model runs in outside training, by device.

    - CPU (and any non-CUDA device): float32. Half-precision matmuls on CPUs are slow or emulated, and
      float32 is what the models were trained in here.
    - CUDA with native bfloat16 (Ampere and newer): bfloat16. Half the memory of float32 (a 13B teacher:
      26 GB instead of 52 GB) and tensor-core speed, with float32's exponent range, so the large
      activations of Llama-family models cannot overflow as they can in float16.
    - older CUDA GPUs (no native bfloat16; emulation is slow): float16, what LLaVA/GeoChat ship in.
    """
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def precision_dtype(precision: Precision, device: torch.device, param: str) -> torch.dtype:
    """The dtype of ``precision`` on ``device``; fp16 only on CUDA (CPUs have no fast float16 kernels, and
    fp16 training needs loss scaling, which torch's GradScaler does on CUDA only). ``param`` names the
    setting in errors (e.g. ``distill.train.precision``)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"{param}: must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"{param} is fp16, which needs a CUDA GPU (this process runs on {device.type}); use bf16 "
            "(runs on CPUs too) or fp32"
        )
    return PRECISIONS[precision]


def load_for_inference(
    model_dir: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Loaded:
    """(model, tokenizer, image transform) of a model folder, ready to answer: eval mode, no gradients,
    on ``device`` (default: the current CUDA device when there is one, else the CPU) in
    :func:`inference_dtype` of that device. Weights are read in that dtype directly (never a float32 copy
    first). Distributed callers pass their rank's device. ``dtype`` overrides the policy only where the
    dtype is itself recorded (the teacher cache's fingerprint holds the dtype of the teacher pass)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    model, tok, transform = _load(resolve(model_dir), dtype or inference_dtype(device), device)
    model.eval().requires_grad_(False)
    return model, tok, transform


def load_for_training(model_dir: str | Path) -> Loaded:
    """(model, tokenizer, image transform) of a model folder as training starts from it: float32 master
    weights on the CPU, parameters trainable (freezing and LoRA are the caller's choice)."""
    return _load(resolve(model_dir), TRAINING_DTYPE)


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


def _load(path: Path, dtype: torch.dtype, device: torch.device | None = None) -> Loaded:
    """Model (in ``dtype``, with SDPA attention), tokenizer and image transform of a checkpoint folder;
    refuses weights that do not match the config (transformers would initialise the gaps at random).
    Each weight is read in ``dtype`` straight onto ``device`` (default: the CPU): a 13B bf16 teacher never
    exists in float32, nor as a whole on the CPU on its way to the GPU."""
    config, tok = check_checkpoint(path)
    try:
        model, info = LlavaForConditionalGeneration.from_pretrained(
            str(path),
            config=config,
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=True,
            dtype=dtype,
            device_map=None if device is None else str(device),
            attn_implementation=ATTENTION,
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"{path}: cannot load the LLaVA weights ({e})") from e
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if bad:
        detail = "; ".join(f"{k}: {sorted(map(str, v))[:5]}" for k, v in bad.items())
        raise ModelError(
            f"{path}: the weights do not match config.json ({detail}); the checkpoint is incomplete"
        )
    if model.get_input_embeddings().num_embeddings != len(tok):
        raise ModelError(
            f"{path}: embed_tokens has {model.get_input_embeddings().num_embeddings} rows but the tokenizer "
            f"{len(tok)} tokens; the checkpoint's config.json and weights disagree"
        )
    set_generation_ids(model, tok)
    return model, tok, ImageTransform.from_dir(path, config.vision_config.image_size)


# ------------------------------------------------------------------------------------------- save


def save_llava(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, image_transform: ImageTransform, path: str | Path
) -> None:
    """Write weights (safetensors), config, tokenizer and preprocessor config to ``path`` atomically
    (a crash never leaves a half-written checkpoint where a stage, or DVC, expects a whole one)."""
    if is_peft(model):
        raise ModelError("the model still has LoRA adapters; merge them first: model = merge_lora(model)")
    base = unwrap(model)
    rows = base.get_input_embeddings().num_embeddings
    if rows != len(tokenizer):
        raise ModelError(
            f"model vocabulary {rows} != len(tokenizer) {len(tokenizer)}; save the matching tokenizer"
        )
    with atomic_dir(path) as tmp:
        base.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        image_transform.save(tmp)


# ----------------------------------------------------------------------------------- fingerprints


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
                # One running hash over every file (not a hash of per-file digests), so fingerprints
                # recorded in adopted.json and cache roots stay valid.
                hashlib.file_digest(fh, lambda: h)
        return h.hexdigest()
    for key, t in model_or_dir.state_dict().items():
        if t.is_meta:
            raise ModelError(f"cannot fingerprint {key}: it is on the meta device (weights not loaded)")
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\0".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def fingerprint(path: Path) -> dict[str, str]:
    """{weights_sha256, tokenizer_sha256} of a checkpoint folder."""
    return {"weights_sha256": weights_hash(path), "tokenizer_sha256": tokenizer_hash(load_tokenizer(path))}


def adopt(src: str | Path, out: Path) -> dict[str, str]:
    """Record a local checkpoint as this pipeline's model without copying it."""
    src = Path(src).resolve()
    check_checkpoint(src)  # fail now, with a clear error, rather than in a later stage (no weights loaded)
    info = {"path": str(src), **fingerprint(src)}
    out.mkdir(parents=True, exist_ok=True)
    (out / ADOPTED).write_text(json.dumps(info, indent=2) + "\n")
    return info


def write_fingerprint(out: Path) -> dict[str, str]:
    """Record the fingerprint of the checkpoint in ``out`` beside it (read back by model_fingerprint)."""
    info = fingerprint(out)
    (out / FINGERPRINT).write_text(json.dumps(info, indent=2) + "\n")
    return info


def model_fingerprint(model_dir: str | Path) -> dict[str, str]:
    """The recorded fingerprint; for an adopted model, checked against the checkpoint as it is now."""
    model_dir = Path(model_dir)
    pointer = _pointer(model_dir)
    if pointer is not None:
        now = fingerprint(Path(pointer["path"]))
        if now != {k: pointer.get(k) for k in now}:
            raise ModelError(
                f"{pointer['path']} changed since it was adopted into {model_dir}; "
                "re-run `dvc repro -f teacher`"
            )
        return now
    if (model_dir / FINGERPRINT).exists():
        return json.loads((model_dir / FINGERPRINT).read_text())
    return fingerprint(model_dir)
