"""Batched greedy decoding with left padding, as the evaluation and chat use it."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from geodistill.data.collate import left_pad
from geodistill.data.records import Turn
from geodistill.data.template import encode_conversation
from geodistill.files import open_image


@dataclass(frozen=True)
class Prompt:
    """One question about one image (the question holds ``<image>`` if it is the first turn)."""

    turns: tuple[Turn, ...]
    image: Image.Image | Path
    """An image, or its path (opened only when its batch is decoded, so a large benchmark stays on disk)."""

    def pil(self) -> Image.Image:
        """The image as RGB; an unreadable file is a DataError naming it."""
        return self.image if isinstance(self.image, Image.Image) else open_image(self.image)


def clean_decode(tok, ids: Sequence[int]) -> str:
    """Decode generated ids up to the first eos, keeping added tokens like ``<12>`` (never 'special')."""
    out = []
    for i in ids:
        if i == tok.eos_token_id:
            break
        if i != tok.pad_token_id:
            out.append(int(i))
    return tok.decode(out, skip_special_tokens=False).strip()


def model_inputs(
    model: torch.nn.Module,
    tok,
    transform: Callable[[Image.Image], torch.Tensor],
    num_image_tokens: int,
    prompts: Sequence[Prompt],
) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (B, T) left-padded, ``pixel_values`` (B, 3, H, W), on the
    model's device, pixels in its dtype: the inputs of one batched ``model.generate``."""
    param = next(model.parameters())
    rows = [encode_conversation(tok, p.turns, num_image_tokens, for_generation=True) for p in prompts]
    ids, mask = left_pad([r.input_ids for r in rows], tok.pad_token_id)
    pixels = torch.stack([transform(p.pil()) for p in prompts])
    return {
        "input_ids": ids.to(param.device),
        "attention_mask": mask.to(param.device),
        "pixel_values": pixels.to(param.device, dtype=param.dtype),
    }


def greedy(
    model: torch.nn.Module, tok, inputs: dict[str, torch.Tensor], max_new_tokens: int, min_new_tokens: int = 0
) -> list[list[int]]:
    """The new token ids of a greedy ``model.generate`` over :func:`model_inputs`, one list per prompt."""
    out = model.generate(
        **inputs,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return out[:, inputs["input_ids"].shape[1] :].tolist()


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    tok,
    transform: Callable[[Image.Image], torch.Tensor],
    num_image_tokens: int,
    prompts: Sequence[Prompt],
    *,
    batch_size: int,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[str], float]:
    """Greedy answers for ``prompts`` (in order) and the seconds spent generating.

    ``min_new_tokens`` forces a decode length (efficiency measurements compare models at equal work).
    """
    model.eval()
    answers: list[str] = []
    seconds = 0.0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        inputs = model_inputs(model, tok, transform, num_image_tokens, chunk)
        t0 = time.perf_counter()
        new = greedy(model, tok, inputs, max_new_tokens, min_new_tokens)
        seconds += time.perf_counter() - t0
        answers.extend(clean_decode(tok, row) for row in new)
        if progress is not None:
            progress(len(chunk))
    return answers, seconds
