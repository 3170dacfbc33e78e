"""Convert an original GeoChat (LLaVA-1.5 layout) checkpoint into an HF ``LlavaForConditionalGeneration``.

    python -m geodistill.models.convert SRC DST [--vision CLIP_DIR_OR_JSON] [--image-size 504] \\
        [--tokenizer DIR] [--dtype float16] [--max-shard-size 5GB]

GeoChat (mbzuai-oryx/GeoChat, ``geochat/model``) stores a ``GeoChatLlamaForCausalLM``:

=================================================  =====================================
GeoChat key                                        HF key on disk (llava-hf layout)
=================================================  =====================================
``model.{embed_tokens,layers,norm}.*``             ``language_model.model.*``
``lm_head.weight``                                 ``language_model.lm_head.weight``
``model.mm_projector.0.*`` (Linear, GELU, ...)     ``multi_modal_projector.linear_1.*``
``model.mm_projector.2.*`` (... Linear)            ``multi_modal_projector.linear_2.*``
``model.vision_tower.vision_tower.vision_model.*``  ``vision_tower.vision_model.*``
=================================================  =====================================

The output uses the key layout of the published ``llava-hf/llava-1.5-*-hf`` checkpoints, which
transformers 5.24 maps onto its module tree when loading (``model.language_model.*``, ``lm_head``,
``model.vision_tower.*``, ``model.multi_modal_projector.*``) and which transformers 4.x loads as is.
Rotary ``inv_freq`` and CLIP ``position_ids`` buffers are dropped (recomputed by transformers).

Vision tower. GeoChat runs OpenAI CLIP ViT-L/14-336 at 504 px: ``clip_encoder.py`` bicubically
interpolates the 24x24 position grid to 36x36 (``align_corners=True``, the CLS row kept), giving
1296 patches + CLS, and reads layer ``mm_vision_select_layer`` (-2) without CLS ("patch"). When the
checkpoint holds the tower (its keys above), its shapes define the vision config; when it does not
(LLaVA loads CLIP at run time), pass the local CLIP folder as ``vision_config_dir_or_dict`` and its
weights are taken and interpolated exactly as GeoChat does. Head count is not visible in the weights:
CLIP uses 64-dim heads, override with ``{"num_attention_heads": n}``.

Tokenizer. GeoChat's Llama tokenizer has no ``<image>`` token (LLaVA splices images at id -200). The
converter adds ``<image>`` as a special token at id ``len(tokenizer)`` and grows ``embed_tokens`` and
``lm_head`` by one row each, set to the mean of the existing rows (LLaVA's own rule for new tokens;
deterministic, and the input row is never read since image features replace it). A tokenizer without
a pad token gets ``pad = unk`` (LLaVA's vicuna_v1 choice), so no further rows. The model vocabulary
equals ``len(tokenizer)``: no padding to a multiple of 64 (llava-hf pads; we keep vocab == tokenizer).

Vocabulary size. ``embed_tokens``/``lm_head`` rows must match the tokenizer; two mismatches are
resolved, with a note, and anything else is refused (a different tokenizer):

- more rows than tokens, the row count a multiple of 64 and at most 64 rows over (a vocabulary
  padded for the GPU, e.g. 32064 rows for llava-hf's 32002 tokens): the rows past the tokenizer are
  padding no token id reaches; they are dropped.
- fewer rows than tokens, every missing id an *added* token of the tokenizer (e.g. llava-hf's
  ``<image>`` and ``<pad>`` over GeoChat's 32000 rows): their rows are added as the mean of the
  trained rows, as above; they start untrained.

The notes go to the returned folder's ``conversion.json`` (with the source and the row counts) and
the CLI prints them.
Loading the Llama ``tokenizer.model`` needs the ``sentencepiece`` and ``protobuf`` packages unless the
folder has a ``tokenizer.json``; ``--tokenizer`` points at another folder.

Memory: tensors are streamed one source file at a time into output shards; the 13B model is never
held in memory whole. The output folder appears only when complete.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import AddedToken
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from geodistill.errors import ModelError
from geodistill.files import atomic_dir
from geodistill.models.checkpoints import ensure_offline
from geodistill.models.llava import num_image_tokens
from geodistill.models.tokenizer import IMAGE, load_tokenizer
from geodistill.models.transform import CLIP_MEAN, CLIP_STD, PREPROCESSOR_FILE, ImageTransform

GEOCHAT_IMAGE_SIZE = 504
"""GeoChat's tower resolution (36 x 36 patches of 14 px)."""
CLIP_VIT_L14_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 336,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
"""openai/clip-vit-large-patch14-336, GeoChat's ``mm_vision_tower``."""

_VISION_SRC = "model.vision_tower.vision_tower.vision_model."
_RENAMES = (
    (_VISION_SRC, "vision_tower.vision_model."),
    ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
    ("model.embed_tokens.", "language_model.model.embed_tokens."),
    ("model.layers.", "language_model.model.layers."),
    ("model.norm.", "language_model.model.norm."),
    ("lm_head.", "language_model.lm_head."),
)
# Buffers transformers recomputes; old checkpoints saved them.
PAD_MULTIPLE = 64
"""Vocabularies padded for the GPU round their rows up to a multiple of this (llava-hf: 32064)."""
CONVERSION_FILE = "conversion.json"
"""The converted folder's record of the conversion: source, vocabulary rows, notes."""
_IGNORED = re.compile(r"(\.rotary_emb\.inv_freq|\.position_ids)$")
# llava-hf disk layout -> transformers 5 module tree, to check names and shapes against the real model.
_DISK_TO_MODULE = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)
EMBED = "language_model.model.embed_tokens.weight"
LM_HEAD = "language_model.lm_head.weight"
POS_EMB = "vision_tower.vision_model.embeddings.position_embedding.weight"


def _rename(key: str) -> str | None:
    for old, new in _RENAMES:
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def _to_module_key(disk_key: str) -> str:
    for old, new in _DISK_TO_MODULE:
        if disk_key.startswith(old):
            return new + disk_key[len(old) :]
    return disk_key


# ---------------------------------------------------------------------------------------- reading


class WeightFiles:
    """Lazy access to the tensors of a checkpoint folder: sharded or single safetensors, or
    ``pytorch_model*.bin`` (loaded with ``weights_only=True``, memory-mapped when possible)."""

    def __init__(self, folder: Path, stack: ExitStack) -> None:
        self.folder = folder
        self._where: dict[str, Any] = {}  # key -> open safetensors handle or loaded .bin dict
        files = self._files(folder)
        if not files:
            raise ModelError(
                f"{folder}: no weights found (expected model*.safetensors or pytorch_model*.bin, "
                "optionally with a *.index.json)"
            )
        for f in files:
            if f.suffix == ".safetensors":
                handle = stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
                for k in handle.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
                    self._where[k] = handle
            else:
                sd = self._load_bin(f)
                for k in sd:
                    self._where[k] = sd

    @staticmethod
    def _files(folder: Path) -> list[Path]:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = folder / index_name
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                files = [folder / name for name in sorted(set(weight_map.values()))]
                missing = [f.name for f in files if not f.is_file()]
                if missing:
                    raise ModelError(f"{index}: shards listed but missing: {missing}")
                return files
        return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))

    @staticmethod
    def _load_bin(f: Path) -> dict[str, torch.Tensor]:
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
            sd = torch.load(f, map_location="cpu", weights_only=True)
        if not isinstance(sd, dict):
            raise ModelError(f"{f}: expected a state dict, found {type(sd).__name__}")
        return sd

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._where))

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        src = self._where[key]
        return tuple(src[key].shape) if isinstance(src, dict) else tuple(src.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        src = self._where[key]
        return src[key] if isinstance(src, dict) else src.get_tensor(key)


# ------------------------------------------------------------------------------------- vision tower


def interpolate_position_embedding(weight: torch.Tensor, grid: int) -> torch.Tensor:
    """(1 + g*g, D) CLIP position embeddings -> (1 + grid*grid, D), as GeoChat's ``clip_encoder.py``:
    bicubic with ``align_corners=True`` over the patch grid, the CLS row unchanged, computed in fp32."""
    cls_row, patches = weight[:1], weight[1:]
    g = math.isqrt(patches.shape[0])
    if g * g != patches.shape[0]:
        raise ModelError(f"position embedding has {patches.shape[0]} patch rows, not a square grid")
    if g == grid:
        return weight
    dim = patches.shape[1]
    x = patches.float().T.reshape(1, dim, g, g)  # (1, D, g, g)
    x = F.interpolate(x, size=grid, mode="bicubic", align_corners=True)  # (1, D, grid, grid)
    x = x.reshape(dim, grid * grid).T  # (grid^2, D)
    return torch.cat([cls_row, x.to(weight.dtype)])


def _infer_vision(src: WeightFiles) -> dict[str, Any]:
    """CLIP config values visible in the tower's weights (heads are not: CLIP's 64-dim heads assumed)."""
    patch = src.shape(_VISION_SRC + "embeddings.patch_embedding.weight")  # (D, 3, p, p)
    positions = src.shape(_VISION_SRC + "embeddings.position_embedding.weight")[0]
    layer_ids = {
        int(m.group(1))
        for k in src
        if (m := re.match(re.escape(_VISION_SRC) + r"encoder\.layers\.(\d+)\.", k))
    }
    fc1 = src.shape(_VISION_SRC + "encoder.layers.0.mlp.fc1.weight")
    return {
        "hidden_size": patch[0],
        "patch_size": patch[-1],
        "image_size": math.isqrt(positions - 1) * patch[-1],
        "num_hidden_layers": len(layer_ids),
        "intermediate_size": fc1[0],
        "num_attention_heads": max(1, patch[0] // 64),
    }


def _clip_dir_config(folder: Path) -> dict[str, Any]:
    file = folder / "config.json"
    if not file.is_file():
        raise ModelError(
            f"{folder}: no config.json; expected a local CLIP checkpoint (e.g. clip-vit-large-patch14-336)"
        )
    raw = json.loads(file.read_text())
    if raw.get("model_type") == "clip":
        raw = raw.get("vision_config") or {}
    elif raw.get("model_type") not in ("clip_vision_model", None):
        raise ModelError(f"{folder}: model_type {raw.get('model_type')!r} is not a CLIP checkpoint")
    keys = set(CLIP_VIT_L14_336) | {
        "attention_dropout",
        "initializer_range",
        "initializer_factor",
        "num_channels",
    }
    return {k: v for k, v in raw.items() if k in keys}


def _clip_dir_tensors(folder: Path, stack: ExitStack) -> dict[str, tuple[WeightFiles, str]]:
    """Vision tensors of a local CLIP checkpoint (CLIPModel or CLIPVisionModel), by HF disk key."""
    files = WeightFiles(folder, stack)
    out = {}
    for k in files:
        if k.startswith("vision_model."):
            rest = k[len("vision_model.") :]
        elif k.startswith(("text_model.", "logit_scale", "visual_projection", "text_projection")):
            continue  # the text tower and CLIP's contrastive heads are not part of LLaVA
        else:
            rest = k  # transformers 5 may save a bare CLIPVisionModel without the prefix
        if not _IGNORED.search(rest):
            out["vision_tower.vision_model." + rest] = (files, k)
    if not out:
        raise ModelError(f"{folder}: no CLIP vision weights found")
    return out


# ------------------------------------------------------------------------------------------ convert


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([KMG]?B?)", text.strip().upper())
    if not m:
        raise ModelError(f"bad size {text!r}; use e.g. 5GB, 500MB or a byte count")
    unit = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30}[
        m.group(2)
    ]
    return int(m.group(1)) * unit


def _text_config(raw: dict[str, Any], vocab: int, tok: Any) -> LlamaConfig:
    missing = [
        k
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        if k not in raw
    ]
    if missing:
        raise ModelError(f"config.json lacks the Llama fields {missing}")
    extra: dict[str, Any] = {}
    if raw.get("rope_scaling"):
        extra["rope_scaling"] = raw["rope_scaling"]
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
        hidden_act=raw.get("hidden_act", "silu"),
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        # LLaMA-1 used 1e-6, Llama-2/Vicuna-1.5 use 1e-5: always take the checkpoint's own value.
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=raw.get("rope_theta", 10000.0),
        attention_bias=raw.get("attention_bias", False),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        **extra,
    )


def _check_layout(raw: dict[str, Any], src: Path) -> None:
    problems = []
    if "mm_hidden_size" not in raw and "mm_vision_tower" not in raw:
        problems.append(
            "config.json has no mm_vision_tower/mm_hidden_size (not a GeoChat/LLaVA-1.5 checkpoint)"
        )
    if raw.get("mm_projector_type", "linear") != "mlp2x_gelu":
        problems.append(
            f"mm_projector_type is {raw.get('mm_projector_type', 'linear')!r}; only LLaVA-1.5's 'mlp2x_gelu' "
            "maps onto LlavaForConditionalGeneration"
        )
    if raw.get("mm_use_im_start_end"):
        problems.append("mm_use_im_start_end=true (image start/end tokens) is not supported")
    if raw.get("mm_vision_select_feature", "patch") not in ("patch", "cls_patch"):
        problems.append(f"unknown mm_vision_select_feature {raw.get('mm_vision_select_feature')!r}")
    if problems:
        raise ModelError(f"{src}: cannot convert: " + "; ".join(problems))


def convert_geochat_checkpoint(
    src_dir: str | Path,
    dst_dir: str | Path,
    vision_config_dir_or_dict: str | Path | dict[str, Any] | None = None,
    *,
    image_size: int | None = None,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Convert the GeoChat checkpoint in ``src_dir`` into an HF LLaVA checkpoint in ``dst_dir``.

    ``vision_config_dir_or_dict``: None (vision config from the tower weights in the checkpoint), a
    dict of ``CLIPVisionConfig`` overrides, or a local CLIP folder (its config, and its weights when the
    checkpoint has no tower). ``image_size`` is the tower resolution; default: the dict's value, else the
    checkpoint's position grid, else GeoChat's 504 (a CLIP folder's 336 grid is interpolated to it).
    ``dtype`` casts floating tensors (default: keep). Returns ``dst_dir``.
    """
    ensure_offline()
    src, dst = Path(src_dir), Path(dst_dir)
    raw = _read_geochat_config(src)
    shard_bytes = _parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    tok = load_tokenizer(Path(tokenizer_dir) if tokenizer_dir else src)
    with ExitStack() as stack:
        files = WeightFiles(src, stack)
        plan = _plan_keys(files, src)
        vision, vision_dir = _vision(raw, files, plan, vision_config_dir_or_dict, image_size, stack)
        rows_n = files.shape(plan[EMBED][1])[0]
        if (head_n := files.shape(plan[LM_HEAD][1])[0]) != rows_n:
            raise ModelError(f"{src}: lm_head has {head_n} rows, embed_tokens {rows_n}; they must agree")
        keep, notes = _complete_tokenizer(tok, raw, rows_n, src)
        config = _llava_config(raw, vision, tok)
        vocab, grid = len(tok), vision["image_size"] // vision["patch_size"]
        _check_shapes(config, plan, vocab, grid, src)
        with atomic_dir(dst) as tmp:  # the output folder appears only when complete
            config.dtype = _write_shards(tmp, _tensors(plan, keep, vocab, grid, dtype), shard_bytes)
            record = {"source": str(src.resolve()), "source_vocab_rows": rows_n, "vocab_size": vocab}
            (tmp / CONVERSION_FILE).write_text(json.dumps({**record, "notes": notes}, indent=2) + "\n")
            config.save_pretrained(str(tmp))
            GenerationConfig(
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
            ).save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
            _transform(vision_dir, vision["image_size"], raw).save(tmp)
    return dst


def _read_geochat_config(src: Path) -> dict[str, Any]:
    """The source's config.json, refused unless its layout maps onto LlavaForConditionalGeneration."""
    if not (src / "config.json").is_file():
        raise ModelError(f"{src}: no config.json; expected a GeoChat checkpoint folder")
    raw = json.loads((src / "config.json").read_text())
    _check_layout(raw, src)
    return raw


def _plan_keys(files: WeightFiles, src: Path) -> dict[str, tuple[WeightFiles, str]]:
    """HF disk key -> (files, source key) for every source tensor. Strict: an unknown key means a layout
    this converter does not know."""
    plan: dict[str, tuple[WeightFiles, str]] = {}
    unknown = []
    for k in files:
        new = _rename(k)
        if new is None:
            if not _IGNORED.search(k):
                unknown.append(k)
        elif not _IGNORED.search(k):
            plan[new] = (files, k)
    if unknown:
        raise ModelError(
            f"{src}: keys outside GeoChat's layout: {sorted(unknown)[:8]} ({len(unknown)} in all)"
        )
    if EMBED not in plan:
        raise ModelError(f"{src}: no model.embed_tokens.weight; not a LLaVA-1.5/GeoChat language model")
    if LM_HEAD not in plan:  # tied checkpoints omit lm_head; Llama unties it
        plan[LM_HEAD] = plan[EMBED]
    return plan


def _vision(
    raw: dict[str, Any],
    files: WeightFiles,
    plan: dict[str, tuple[WeightFiles, str]],
    vision_config_dir_or_dict: str | Path | dict[str, Any] | None,
    image_size: int | None,
    stack: ExitStack,
) -> tuple[dict[str, Any], Path | None]:
    """The ``CLIPVisionConfig`` values and the CLIP folder used (if any). A checkpoint without a tower
    takes the CLIP folder's weights: they are added to ``plan``."""
    vision: dict[str, Any] = dict(CLIP_VIT_L14_336)
    has_tower = (_VISION_SRC + "embeddings.patch_embedding.weight") in files
    vision_dir = None
    overrides: dict[str, Any] = {}
    if isinstance(vision_config_dir_or_dict, dict):
        overrides = dict(vision_config_dir_or_dict)
    elif vision_config_dir_or_dict is not None:
        vision_dir = Path(vision_config_dir_or_dict)
        vision.update(_clip_dir_config(vision_dir))
    if has_tower:
        inferred = _infer_vision(files)
        if vision_dir is not None:  # the CLIP folder knows the head count; the weights only guess it
            inferred.pop("num_attention_heads")
        vision.update(inferred)
    elif vision_dir is not None:
        plan.update(_clip_dir_tensors(vision_dir, stack))
        vision["image_size"] = GEOCHAT_IMAGE_SIZE  # GeoChat interpolates CLIP's grid at load time
    else:
        raise ModelError(
            f"{files.folder}: the checkpoint has no vision tower weights ({_VISION_SRC}*); pass the local "
            f"CLIP checkpoint it was trained with ({raw.get('mm_vision_tower', 'a CLIP ViT')}) as "
            "vision_config_dir_or_dict / --vision"
        )
    vision.update(overrides)
    if image_size is not None:
        vision["image_size"] = image_size
    if vision["image_size"] % vision["patch_size"]:
        raise ModelError(
            f"image_size {vision['image_size']} is not a multiple of patch {vision['patch_size']}"
        )
    if raw.get("mm_hidden_size") not in (None, vision["hidden_size"]):
        raise ModelError(
            f"mm_hidden_size {raw['mm_hidden_size']} differs from the tower width {vision['hidden_size']}"
        )
    return vision, vision_dir


def _complete_tokenizer(tok: Any, raw: dict[str, Any], rows_n: int, src: Path) -> tuple[int, list[str]]:
    """Add ``<image>`` (and pad = unk) in place, so the model vocabulary equals ``len(tok)``.

    Returns how many of the source's ``rows_n`` embedding rows to keep (the rest is padding) and the
    notes on any resize (module docstring, "Vocabulary size")."""
    if (
        rows_n == len(tok) + 1
        and raw.get("mm_use_im_patch_token", True)
        and "<im_patch>" not in tok.get_vocab()
    ):
        # builder.py adds <im_patch> (id 32000) when mm_use_im_patch_token is set; keep its row.
        tok.add_tokens([AddedToken("<im_patch>", special=True, normalized=False)], special_tokens=True)
    keep, notes = _vocab_rows(tok, rows_n, src)
    if IMAGE not in tok.get_vocab():
        tok.add_tokens([AddedToken(IMAGE, special=True, normalized=False)], special_tokens=True)
    if tok.pad_token is None:
        if tok.unk_token is None:
            raise ModelError(f"{src}: the tokenizer has neither a pad nor an unk token to pad with")
        tok.pad_token = tok.unk_token
    return keep, notes


def _vocab_rows(tok: Any, rows_n: int, src: Path) -> tuple[int, list[str]]:
    """Source embedding rows to keep, and notes, when ``rows_n`` and ``len(tok)`` differ in a known way."""
    n_tok = len(tok)
    if rows_n > n_tok and rows_n % PAD_MULTIPLE == 0 and rows_n - n_tok <= PAD_MULTIPLE:
        return n_tok, [
            f"embed_tokens and lm_head have {rows_n} rows for a tokenizer of {n_tok} tokens: rows "
            f"{n_tok}..{rows_n - 1} pad the vocabulary to a multiple of {PAD_MULTIPLE} and no token id "
            "reaches them; dropped"
        ]
    missing = range(rows_n, n_tok)
    added = set(tok.added_tokens_decoder)
    if rows_n < n_tok and all(i in added for i in missing):
        names = tok.convert_ids_to_tokens(list(missing))
        return rows_n, [
            f"the tokenizer has {n_tok} tokens but embed_tokens and lm_head only {rows_n} rows: rows for "
            f"its added tokens {names} (ids {rows_n}..{n_tok - 1}) are added as the mean of the trained "
            "rows; they start untrained"
        ]
    if rows_n != n_tok:
        raise ModelError(
            f"{src}: embed_tokens has {rows_n} rows but the tokenizer has {n_tok} tokens (neither padding "
            f"to a multiple of {PAD_MULTIPLE} nor added tokens); use the tokenizer these weights were "
            "trained with (--tokenizer)"
        )
    return rows_n, []


def _llava_config(raw: dict[str, Any], vision: dict[str, Any], tok: Any) -> LlavaConfig:
    """The converted model's config: GeoChat's feature layer and selection, exact-GELU projector."""
    select = raw.get("mm_vision_select_feature", "patch")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=_text_config(raw, len(tok), tok),
        image_token_index=tok.convert_tokens_to_ids(IMAGE),
        projector_hidden_act="gelu",  # GeoChat's nn.GELU() (exact erf form)
        vision_feature_select_strategy="full" if select == "cls_patch" else "default",
        vision_feature_layer=raw.get("mm_vision_select_layer", -2),
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    config.image_seq_length = num_image_tokens(config)
    return config


def _check_shapes(
    config: LlavaConfig, plan: dict[str, tuple[WeightFiles, str]], vocab: int, grid: int, src: Path
) -> None:
    """Names and shapes of the converted tensors against the real module tree, built on the meta device
    (no memory), before anything is written."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LlavaForConditionalGeneration(config).state_dict().items()}

    def target_shape(disk_key: str) -> tuple[int, ...]:
        f, k = plan[disk_key]
        shape = f.shape(k)
        if disk_key in (EMBED, LM_HEAD):
            return (vocab, *shape[1:])
        if disk_key == POS_EMB:
            return (grid * grid + 1, *shape[1:])
        return shape

    got = {_to_module_key(k): target_shape(k) for k in plan}
    problems = [f"missing {k}" for k in sorted(expected.keys() - got.keys())]
    problems += [f"unexpected {k}" for k in sorted(got.keys() - expected.keys())]
    problems += [
        f"{k}: shape {got[k]} != {expected[k]}"
        for k in sorted(got.keys() & expected.keys())
        if got[k] != expected[k]
    ]
    if problems:
        raise ModelError(f"{src}: converted weights do not fit the HF LLaVA model: {problems[:8]}")


def _transform(vision_dir: Path | None, size: int, raw: dict[str, Any]) -> ImageTransform:
    mean, std = CLIP_MEAN, CLIP_STD
    if vision_dir is not None and (vision_dir / PREPROCESSOR_FILE).is_file():
        clip = ImageTransform.from_dir(vision_dir, size)
        mean, std = clip.mean, clip.std
    # LLaVA-1.5 trains with image_aspect_ratio 'pad' (pad to square with the mean colour).
    return ImageTransform(size, mean, std, pad_to_square=raw.get("image_aspect_ratio") == "pad")


def _tensors(
    plan: dict[str, tuple[WeightFiles, str]], keep: int, vocab: int, grid: int, dtype: torch.dtype | None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The converted tensors; embedding and lm_head rows: the first ``keep`` source rows (the rest is
    padding), then new token rows up to ``vocab``."""
    for disk_key, (files, key) in plan.items():
        t = files.get(key)
        if disk_key in (EMBED, LM_HEAD):
            t = t[:keep]
            if keep < vocab:  # new token rows (<image>, ...) = mean of the trained rows, computed in fp32
                mean = t.float().mean(dim=0, keepdim=True).to(t.dtype)
                t = torch.cat([t, mean.expand(vocab - keep, -1)])
        if disk_key == POS_EMB:
            t = interpolate_position_embedding(t, grid)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        # A private contiguous copy: safetensors refuses tensors that share storage (tied .bin weights).
        yield disk_key, t.detach().clone().contiguous()


def _write_shards(
    folder: Path, tensors: Iterator[tuple[str, torch.Tensor]], shard_bytes: int
) -> torch.dtype | None:
    """Write ``model.safetensors`` (or numbered shards + index); returns the first float dtype."""
    names: list[str] = []
    first_dtype: torch.dtype | None = None
    weight_map: dict[str, str] = {}
    total = 0
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal shard, size
        name = f"model-part-{len(names) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        names.append(name)
        for k in shard:
            weight_map[k] = name
        shard, size = {}, 0

    for key, t in tensors:
        if first_dtype is None and t.is_floating_point():
            first_dtype = t.dtype
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > shard_bytes:
            flush()
        shard[key] = t
        size += nbytes
        total += nbytes
    if shard:
        flush()
    if len(names) == 1:
        os.replace(folder / names[0], folder / "model.safetensors")
        return first_dtype
    final = {n: f"model-{i + 1:05d}-of-{len(names):05d}.safetensors" for i, n in enumerate(names)}
    for old, new in final.items():
        os.replace(folder / old, folder / new)
    index = {
        "metadata": {"total_size": total},
        "weight_map": {k: final[v] for k, v in sorted(weight_map.items())},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return first_dtype


# ----------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m geodistill.models.convert",
        description="Convert a GeoChat (LLaVA-1.5 layout) checkpoint to HF LlavaForConditionalGeneration.",
    )
    parser.add_argument("src", help="GeoChat checkpoint folder (config.json, weights, tokenizer)")
    parser.add_argument("dst", help="output folder (replaced when complete)")
    parser.add_argument(
        "--vision", help="local CLIP checkpoint folder, or a JSON object of CLIPVisionConfig overrides"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        help=f"tower resolution (default: from the weights, else {GEOCHAT_IMAGE_SIZE})",
    )
    parser.add_argument("--tokenizer", help="tokenizer folder (default: SRC)")
    parser.add_argument(
        "--dtype", choices=("float16", "bfloat16", "float32"), help="cast weights (default: keep)"
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    args = parser.parse_args(argv)
    vision: str | dict[str, Any] | None = args.vision
    if vision is not None and vision.lstrip().startswith("{"):
        vision = json.loads(vision)
    try:
        out = convert_geochat_checkpoint(
            args.src,
            args.dst,
            vision,
            image_size=args.image_size,
            tokenizer_dir=args.tokenizer,
            dtype=getattr(torch, args.dtype) if args.dtype else None,
            max_shard_size=args.max_shard_size,
        )
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for note in json.loads((out / CONVERSION_FILE).read_text())["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {out} (conversion record: {out / CONVERSION_FILE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
