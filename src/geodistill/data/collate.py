"""From shard samples to model batches: a deterministic record stream, the collate functions, and the
left padding of prompts that generation (evaluation, on-policy sampling) uses.

Training streams records out of the shards of this rank, shuffles them with a seeded buffer (the same
seed gives the same batch order, so baseline, control and distilled student see identical data), and
decodes images only when a batch is built, so skipping ahead on resume is cheap.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from geodistill.data.records import Record
from geodistill.data.shards import iter_samples
from geodistill.data.template import Tokenizer, encode_conversation

IGNORE = -100


@dataclass(frozen=True)
class Example:
    """One record with its (still encoded) image."""

    record: Record
    image_bytes: bytes
    sample_key: str = ""
    """Key of the shard sample (image) it came from; with ``index`` it names the record in the cache."""
    index: int = 0
    """Position of the record within its shard sample."""

    def image(self) -> Image.Image:
        return Image.open(io.BytesIO(self.image_bytes)).convert("RGB")


def iter_examples(
    shard_dir: Path, *, rank: int = 0, world_size: int = 1, verify: bool = True
) -> Iterator[Example]:
    """Every record of this rank's shards, in manifest order (one pass)."""
    for sample in iter_samples(shard_dir, rank=rank, world_size=world_size, verify=verify):
        for i, rec in enumerate(sample.records):
            yield Example(rec, sample.image_bytes, sample.key, i)


def text_length(ex: Example) -> int:
    """Characters of a record's conversation: the length key of ``length_group`` batching. Tokenizer-free,
    so every model (teacher, baseline, control, distilled student) groups the same records together."""
    return sum(len(turn.value) for turn in ex.record.conversations)


def shuffled_batches(
    shard_dir: Path,
    batch_size: int,
    seed: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    buffer: int = 4096,
    length_group: int = 0,
) -> Iterator[list[Example]]:
    """Endless batches: epoch e is shuffled with a buffer seeded by (seed, rank, e). Deterministic.

    ``length_group`` > 0 takes that many batches' worth of the shuffled stream at a time, sorts it by
    :func:`text_length`, cuts it into batches and yields those in a seeded random order: a batch then
    pads to records of similar length, and every record still comes once per epoch (docs/design.md,
    "Scale", has what it saves and costs).
    """
    examples = _shuffled_examples(shard_dir, seed, rank, world_size, buffer)
    if length_group <= 0:
        while True:
            yield [next(examples) for _ in range(batch_size)]
    rng = random.Random(f"{seed}-{rank}-length-groups")
    while True:
        group = sorted((next(examples) for _ in range(batch_size * length_group)), key=text_length)
        batches = [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
        rng.shuffle(batches)
        yield from batches


def _shuffled_examples(
    shard_dir: Path, seed: int, rank: int, world_size: int, buffer: int
) -> Iterator[Example]:
    """This rank's records, epoch after epoch, each epoch shuffled with a buffer seeded by (seed, rank,
    epoch). Batching cuts this stream, so a partial last batch of an epoch carries over into the next."""
    epoch = 0
    verify = True
    while True:
        rng = random.Random(f"{seed}-{rank}-{epoch}")
        pool: list[Example] = []
        n = 0
        for ex in iter_examples(shard_dir, rank=rank, world_size=world_size, verify=verify):
            n += 1
            pool.append(ex)
            if len(pool) >= buffer:
                yield pool.pop(rng.randrange(len(pool)))
        if n == 0:
            raise ValueError(f"{shard_dir}: rank {rank} of {world_size} has no records")
        rng.shuffle(pool)
        yield from pool
        verify = False  # checked once; later epochs re-read the same verified files
        epoch += 1


@dataclass
class Batch:
    """Right-padded training batch."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T) token ids to predict, IGNORE elsewhere (unshifted: labels[t] = ids[t])
    pixel_values: torch.Tensor  # (B, 3, H, W)
    record_ids: list[str]
    image_ids: list[str]
    truncated: int
    """Records cut at max_len in this batch (their tail answers lose supervision)."""

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.pixel_values.to(device),
            self.record_ids,
            self.image_ids,
            self.truncated,
        )

    @property
    def target_mask(self) -> torch.Tensor:
        """(B, T) positions whose token is supervised."""
        return self.labels != IGNORE


def collate(
    examples: Sequence[Example],
    tok: Tokenizer,
    transform: Callable[[Image.Image], torch.Tensor],
    num_image_tokens: int,
    max_len: int,
    pad_id: int,
) -> Batch:
    """Tokenise with the vicuna_v1 template, right-pad, and stack images."""
    ids_list, mask_list = [], []
    truncated = 0
    for ex in examples:
        enc = encode_conversation(tok, ex.record.conversations, num_image_tokens)
        ids, mask = enc.input_ids, enc.assistant_mask
        if len(ids) > max_len:
            truncated += 1
            ids, mask = ids[:max_len], mask[:max_len]
        ids_list.append(ids)
        mask_list.append(mask)
    t = max(len(x) for x in ids_list)
    b = len(examples)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    attention = torch.zeros((b, t), dtype=torch.long)
    labels = torch.full((b, t), IGNORE, dtype=torch.long)
    for i, (ids, mask) in enumerate(zip(ids_list, mask_list, strict=True)):
        row = torch.tensor(ids, dtype=torch.long)
        input_ids[i, : len(ids)] = row
        attention[i, : len(ids)] = 1
        m = torch.tensor(mask, dtype=torch.bool)
        labels[i, : len(ids)][m] = row[m]
    pixel_values = torch.stack([transform(ex.image()) for ex in examples])
    return Batch(
        input_ids,
        attention,
        labels,
        pixel_values,
        [ex.record.id for ex in examples],
        [ex.record.image_id for ex in examples],
        truncated,
    )


def collate_text(
    texts: Sequence[str], tok: Tokenizer, max_len: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pretraining texts -> (input_ids, labels) (B, T); every real token is a target (L_PT)."""
    rows = []
    for text in texts:
        ids = ([] if tok.bos_token_id is None else [tok.bos_token_id]) + tok.encode(
            text, add_special_tokens=False
        )
        rows.append(ids[:max_len] + ([tok.eos_token_id] if len(ids) < max_len else []))
    t = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), t), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(r)] = torch.tensor(r)
    return input_ids, labels


def left_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, padded on the left so every prompt ends at the last column."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, t - len(r) :] = 1
    return ids, mask
