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


@dataclass(frozen=True)
class Prompt:
    """One question about one image (the question holds ``<image>`` if it is the first turn)."""

    turns: tuple[Turn, ...]
    image: Image.Image | Path
    """An image, or its path (opened only when its batch is decoded, so a large benchmark stays on disk)."""

    def pil(self) -> Image.Image:
        return self.image if isinstance(self.image, Image.Image) else Image.open(self.image).convert("RGB")


def clean_decode(tok, ids: Sequence[int]) -> str:
    """Decode generated ids up to the first eos, keeping added tokens like ``<12>`` (never 'special')."""
    out = []
    for i in ids:
        if i == tok.eos_token_id:
            break
        if i != tok.pad_token_id:
            out.append(int(i))
    return tok.decode(out, skip_special_tokens=False).strip()


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
    device = next(model.parameters()).device
    answers: list[str] = []
    seconds = 0.0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        rows = [
            encode_conversation(tok, p.turns, num_image_tokens, for_generation=True).input_ids for p in chunk
        ]
        ids, mask = left_pad(rows, tok.pad_token_id)
        pixels = torch.stack([transform(p.pil()) for p in chunk])
        t0 = time.perf_counter()
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            pixel_values=pixels.to(device, dtype=next(model.parameters()).dtype),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        seconds += time.perf_counter() - t0
        new = out[:, ids.shape[1] :].tolist()
        answers.extend(clean_decode(tok, row) for row in new)
        if progress is not None:
            progress(len(chunk))
    return answers, seconds
