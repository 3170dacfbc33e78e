"""Per-image prefix reuse in the teacher pass: teacher cost per record with and without it.

    python -m geodistill.bench.prefix [--image-tokens 576 1296] [--records 1 3 5 10] [--repeats 3]
        [--hidden 768] [--layers 2] [--intermediate 2048] [--heads 6] [--vocab 384] [--k 16]

A LLaVA with random weights whose shape keeps GeoChat's proportions where they decide the gain: 576
(LLaVA-1.5 at 336 px) or 1296 (GeoChat at 504 px) image tokens per record against ~60-150 text tokens
(a 34-token system prompt, a 8-40 token question, a 10-68 token answer), a CLIP tower that costs a few %
of a record, and a vocabulary whose lm_head is a few % of the LLM (GeoChat-13B: 1.3 %; 384 x 768 on two
layers: ~2.5 %). The widths are scaled down to run on a CPU core in minutes; a narrow model gives attention a
larger share than a 5120-wide one (it grows with sequence / width), and the suffix pass keeps every
record's attention to the whole prefix, so the measured gain is conservative. The table prints each
shape's FLOP shares from the planner's arithmetic (``geodistill.plan.arithmetic``) with the ratio it
predicts.

Each cell is one image with R records in one batch (what a shard sample gives the builder), run through
``teacher_signals`` exactly as ``build_cache`` runs it, with ``prefix_reuse`` on and off: warm-up, then
``--repeats`` interleaved rounds; seconds per record are medians, the ratio is the median of the paired
per-round ratios. "max |d log p|" is the largest difference between the two passes' cached log-probs
(top-k and target), float32. One torch thread.

A second table times the embedded default (``--embedded-batches`` batches, 0 skips it): the default teacher
architecture (random weights: the cost is the same), the default tokenizer size, synthetic shards with the
pipeline's scene settings, ``cache.batch_size`` records per batch as ``build_cache`` reads them.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from geodistill.cache.build import TeacherOutput, shard_batches, teacher_signals
from geodistill.config import CacheConfig, LlavaArch, TeacherConfig, TokenizerConfig
from geodistill.data.collate import IGNORE, Batch, collate
from geodistill.data.prepare import tokenizer_corpus
from geodistill.data.shards import load_manifest
from geodistill.markdown import table
from geodistill.models.llava import build_llava, llava_config, num_image_tokens
from geodistill.models.tokenizer import build_tokenizer
from geodistill.models.transform import ImageTransform
from geodistill.plan.arithmetic import Flops, image_flops, llm_flops
from geodistill.plan.shapes import shape_of

PATCH = 14
"""CLIP ViT-L/14's patch: 336 px -> 576 image tokens, 504 px -> 1296."""
SYSTEM_TOKENS, USER_TOKENS, ASSISTANT_TOKENS = 34, 3, 3
"""Lengths of vicuna_v1's system prompt, ``USER: `` and `` ASSISTANT:`` in Llama's tokenizer."""
QUESTION, ANSWER = (8, 40), (10, 68)
"""Token ranges drawn per record (with the fixed parts: 60-150 text tokens)."""


@dataclass(frozen=True)
class Vocab:
    """The part of a tokenizer ``llava_config`` reads: a vocabulary of ``size`` ids, ``<image>`` the last."""

    size: int
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    unk_token_id: None = None
    unk_token: None = None

    def __len__(self) -> int:
        return self.size

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.size - 1


def build_model(args: argparse.Namespace, image_tokens: int) -> torch.nn.Module:
    """A random-weight LLaVA of the bench's shape with ``image_tokens`` image tokens (float32, eval)."""
    side = round(image_tokens**0.5)
    if side * side != image_tokens:
        raise SystemExit(f"--image-tokens {image_tokens}: must be a square (a patch grid), e.g. 576 or 1296")
    arch = LlavaArch(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.heads,
        vision_hidden_size=128,
        vision_intermediate_size=512,
        vision_layers=3,
        vision_heads=2,
        image_size=side * PATCH,
        patch_size=PATCH,
        max_position_embeddings=image_tokens + 512,
    )
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(llava_config(arch, Vocab(args.vocab)))  # type: ignore[arg-type]
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # peaked next-token distributions, like a trained model's
    return model.eval()


def image_batch(model: torch.nn.Module, records: int, vocab: int, gen: torch.Generator) -> Batch:
    """One image and ``records`` records about it, right-padded: bos, system, USER:, image, question,
    ASSISTANT:, answer, eos; answer and eos supervised."""
    cfg = model.config
    n_img, image_id = cfg.image_seq_length, cfg.image_token_id

    def text(n: int) -> list[int]:
        return torch.randint(3, vocab - 1, (n,), generator=gen).tolist()  # no special or image id

    shared = [1, *text(SYSTEM_TOKENS), *text(USER_TOKENS), *[image_id] * n_img]
    assistant = text(ASSISTANT_TOKENS)
    rows = []
    for _ in range(records):
        q = text(int(torch.randint(QUESTION[0], QUESTION[1] + 1, (), generator=gen)))
        a = [*text(int(torch.randint(ANSWER[0], ANSWER[1] + 1, (), generator=gen))), 2]
        rows.append((shared + q + assistant, a))
    t = max(len(p) + len(a) for p, a in rows)
    ids = torch.zeros(records, t, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, IGNORE)
    for i, (p, a) in enumerate(rows):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        mask[i, : len(p) + len(a)] = 1
        labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
    size = cfg.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=gen).expand(records, -1, -1, -1)
    return Batch(ids, mask, labels, pixels, [str(i) for i in range(records)], ["image"] * records, 0)


def _max_diff(a: TeacherOutput, b: TeacherOutput) -> float:
    top = np.abs(a.topk_logprobs - b.topk_logprobs).max()
    return float(max(top, np.abs(a.target_logprob - b.target_logprob).max()))


def measure(model: torch.nn.Module, batches: list[Batch], k: int, repeats: int) -> dict[str, float]:
    """Median seconds per record of both passes, their paired ratio and the largest log-prob difference."""

    def run(reuse: bool) -> list[TeacherOutput]:
        return [teacher_signals(model, b, k, 1, prefix_reuse=reuse) for b in batches]

    runs = {reuse: functools.partial(run, reuse) for reuse in (False, True)}
    outs = {reuse: fn() for reuse, fn in runs.items()}  # warm-up
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for reuse, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[reuse].append(time.perf_counter() - t0)
    n = sum(len(b.image_ids) for b in batches)
    return {
        "plain": statistics.median(times[False]) / n,
        "reuse": statistics.median(times[True]) / n,
        "ratio": statistics.median(r / p for r, p in zip(times[True], times[False], strict=True)),
        "diff": max(_max_diff(a, b) for a, b in zip(outs[True], outs[False], strict=True)),
    }


def predicted(model: torch.nn.Module, batch: Batch) -> tuple[Flops, float]:
    """The planner's per-record FLOPs of the plain pass, and its reuse / plain ratio, for this batch."""
    shape = shape_of(model, "bench", "random")
    lengths = batch.attention_mask.sum(1).tolist()
    prefix = 1 + SYSTEM_TOKENS + USER_TOKENS + shape.image_tokens
    plain = [image_flops(shape) + llm_flops(shape, t, t) for t in lengths]
    reuse = (image_flops(shape) + llm_flops(shape, prefix, prefix)).total
    reuse += sum(llm_flops(shape, t - prefix, t).total for t in lengths)
    total = sum(plain, Flops())
    return total, reuse / total.total


def embedded_default(n_batches: int, repeats: int) -> dict[str, float]:
    """Both passes over the first batches of synthetic shards, through the default teacher's shape."""
    from geodistill.bench.cache import synthetic_shards  # the cache bench's synthetic data

    cfg, arch = CacheConfig(), TeacherConfig().arch
    with tempfile.TemporaryDirectory(prefix="bench-prefix-") as tmp:
        shards = synthetic_shards(Path(tmp), n_batches * cfg.batch_size)
        tok = build_tokenizer(tokenizer_corpus(Path(tmp) / "prepared"), TokenizerConfig().vocab_size)
        model = build_llava(arch, tok, seed=0).eval()
        transform, n_img = ImageTransform(arch.image_size), num_image_tokens(model)

        def collate_fn(examples: list) -> Batch:
            return collate(examples, tok, transform, n_img, arch.max_position_embeddings, tok.pad_token_id)

        name = load_manifest(shards)["shards"][0]["name"]
        batches = [kb.batch for kb in shard_batches(shards / name, cfg.batch_size, collate_fn)][:n_batches]
    m = measure(model, batches, cfg.k, repeats)
    m["records"] = sum(len(b.image_ids) for b in batches)
    m["images"] = len({i for b in batches for i in b.image_ids})
    return m


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-tokens", type=int, nargs="+", default=[576, 1296])
    ap.add_argument("--records", type=int, nargs="+", default=[1, 3, 5, 10], help="records per image")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=384)
    ap.add_argument("--k", type=int, default=CacheConfig().k)
    ap.add_argument("--embedded-batches", type=int, default=4, help="embedded default batches (0: skip)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n_img in args.image_tokens:
        model = build_model(args, n_img)
        for records in args.records:
            batch = image_batch(model, records, args.vocab, gen)
            m = measure(model, [batch], args.k, args.repeats)
            flops, ratio = predicted(model, batch)
            share = {name: getattr(flops, name) / flops.total for name in ("vision", "attention", "lm_head")}
            text = float(batch.attention_mask.sum(1).float().mean()) - n_img
            cells = [n_img, records, f"{text:.0f}", f"{m['plain']:.3f}", f"{m['reuse']:.3f}"]
            cells += [f"{m['ratio']:.2f}", f"{ratio:.2f}", *(f"{100 * v:.1f}" for v in share.values())]
            rows.append([*cells, f"{m['diff']:.1e}"])
    print(
        f"LLM {args.layers} x {args.hidden} (MLP {args.intermediate}, {args.heads} heads), "
        f"vocab {args.vocab}, CLIP 3 x 128 at patch {PATCH}; k = {args.k}; "
        f"medians of {args.repeats} rounds, 1 torch thread\n"
    )
    columns = ["image tokens", "records/image", "text tokens", "plain s/rec", "reuse s/rec", "reuse/plain"]
    columns += ["predicted", "vision %", "attention %", "lm_head %", "max |d log p|"]
    print(table(columns, rows))
    if args.embedded_batches > 0:
        m = embedded_default(args.embedded_batches, args.repeats)
        size = CacheConfig().batch_size
        print(f"\nembedded default: {m['records']} records of {m['images']} images, batches of {size}\n")
        cells = [f"{m['plain']:.4f}", f"{m['reuse']:.4f}", f"{m['ratio']:.2f}", f"{m['diff']:.1e}"]
        print(table(["plain s/rec", "reuse s/rec", "reuse/plain", "max |d log p|"], [cells]))


if __name__ == "__main__":
    main()
