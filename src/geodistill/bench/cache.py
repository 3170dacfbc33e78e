"""Teacher-cache stage benchmark: bytes on disk, builder throughput, and the top-k approximation error.

    python -m geodistill.bench.cache --model PATH [--shards DIR] [--k 4 8 16 32 64] [--batch-size 64]
        [--encoding float16 float32 uint8_log] [--pooling 1 2] [--batches 6] [--repeats 3]
        [--no-prefix-reuse] [--every-position]

``--model``: any local Hugging Face checkpoint (or pipeline model folder, ``adopted.json`` included). A
LLaVA (``model_type: llava``) runs on the pipeline's shards with their images, through the builder's
own per-shard loop; any other model loads with ``AutoModelForCausalLM`` and runs on the same records
as text-only vicuna_v1 prompts (no image, no features), its answers supervised, or every token with
``--every-position`` (the top-k extraction's worst case). Without ``--shards`` a small synthetic set is
generated in a temporary folder, with the pipeline's scene settings (``data.synthetic``). Only the first
``--batches`` batches are used. One torch thread; ``--device`` defaults to cuda when available. The
defaults of k, batch size, encoding (the first one is timed) and pooling include the pipeline's
(``cache.*``); so does ``--prefix-reuse`` (``cache.prefix_reuse``; the bare forward of (b) is always the
plain one, so with reuse the ratio can exceed 1 on shards with several records per image).

It prints:

(a) bytes on disk per cached token for each k and encoding: ``topk_ids`` + the encoding's value arrays
    (+ ``target_logprob``, always float32), measured as the chunk files the store wrote (Blosc zstd-3 +
    shuffle); and bytes per image of the float16 projector features for each ``--pooling``.
(b) throughput: a bare teacher forward over pre-collated batches, against the builder's full loop over
    the same batches (read the tar, decode, collate, forward, top-k, encode, write, commit), run
    sequentially (what ``build_cache`` does on CPU) and with its reader/writer threads (what it does on
    a GPU); warm-up, then ``--repeats`` interleaved rounds, medians. ratio = the median of each round's
    bare / build (paired, so slow drifts in machine load cancel); >= 0.9 means the cache stage is not
    the bottleneck. The batches go into one shard group, so its fixed cost
    (creating arrays, commit: ~0.08 s) weighs more than in a real shard: the ratio is conservative.
    A sequential profile (read + collate, forward + top-k + features, encode + write) says where the
    rest goes.
(c) the top-k approximation error: the mean KL(p || p_k) between the teacher's full next-token
    distribution p and its (k+1)-bucket reconstruction p_k (top-k kept, the tail mass spread uniformly
    over the other V - k tokens), exact and after each encoding's rounding. The KL the losses see at k
    is a lower bound of the exact one (data-processing inequality: merging the tail tokens into one
    bucket can only shrink a divergence); the last columns show it for a stand-in student q = the
    teacher at temperature 2: exact KL(q || p) over V tokens against the (k+1)-bucket reverse KL of
    ``distill.losses`` from the cached top-k.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from geodistill.cache import codec, store
from geodistill.cache.build import (
    KeyedBatch,
    TeacherOutput,
    build_shard,
    shard_batches,
    teacher_signals,
    topk_signals,
)
from geodistill.cache.fingerprint import scratch_fingerprint
from geodistill.config import CacheConfig, DataConfig, SyntheticConfig
from geodistill.data.collate import IGNORE, Batch, Example, collate
from geodistill.data.prepare import prepare
from geodistill.data.shards import load_manifest, write_shards
from geodistill.data.template import encode_conversation
from geodistill.distill.losses import reverse_kl
from geodistill.errors import ModelError
from geodistill.markdown import table
from geodistill.models.checkpoints import ensure_offline, load_for_inference, resolve
from geodistill.models.features import pool_image_features
from geodistill.models.llava import num_image_tokens

STUDENT_TEMPERATURE = 2.0
"""The stand-in student of (c): the teacher's own logits divided by this (a flatter distribution)."""


# ------------------------------------------------------------------------------------- the teacher


@dataclass
class TextBatch:
    """Text-only teacher-forced batch for a plain causal LM (right-padded)."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T) unshifted, IGNORE off the answers

    def to(self, device: torch.device | str) -> TextBatch:
        return TextBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


@dataclass
class Teacher:
    """A loaded teacher and how to batch, run and read it; LLaVA and causal LM differ only here."""

    kind: str  # "llava" or "causal_lm"
    model: nn.Module
    vocab_size: int  # size of the logits' last dimension
    collate: Callable[[list[Example]], Any]  # examples -> the model's batch
    forward: Callable[[Any], torch.Tensor]  # batch -> logits (B, T, V): the bare teacher forward
    signals: Callable[[Any, int], TeacherOutput]  # (batch, k) -> what the builder writes (features unpooled)


def load_teacher(
    path: Path, device: torch.device, *, prefix_reuse: bool = False, every_position: bool = False
) -> Teacher:
    """A LLaVA through the pipeline's loader, anything else through AutoModelForCausalLM (float32).
    ``prefix_reuse``: the LLaVA signals share each image's prefix as ``cache.prefix_reuse`` does;
    ``every_position``: a causal LM is supervised at every token, not only the answers."""
    ensure_offline()
    folder = resolve(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{folder}: no config.json; --model must be a local Hugging Face checkpoint folder")
    if json.loads(config_file.read_text()).get("model_type") == "llava":
        return _llava_teacher(folder, device, prefix_reuse)
    return _causal_lm_teacher(folder, device, every_position)


def _llava_teacher(folder: Path, device: torch.device, prefix_reuse: bool) -> Teacher:
    model, tok, transform = load_for_inference(folder, device=device)
    n_img, max_len = num_image_tokens(model), int(model.config.text_config.max_position_embeddings)

    def forward(batch: Batch) -> torch.Tensor:
        batch = batch.to(device)
        return model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values
        ).logits

    return Teacher(
        "llava",
        model,
        model.config.text_config.vocab_size,
        lambda exs: collate(exs, tok, transform, n_img, max_len, tok.pad_token_id),
        forward,
        # Exactly what build_cache runs; unpooled, so that (a) can pool the features per --pooling.
        lambda batch, k: teacher_signals(model, batch, k, pooling=1, prefix_reuse=prefix_reuse),
    )


def _causal_lm_teacher(folder: Path, device: torch.device, every_position: bool) -> Teacher:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False, dtype=torch.float32
        )
    except (OSError, ValueError) as e:
        raise ModelError(f"{folder}: cannot load a causal LM and its tokenizer ({e})") from e
    model.eval().to(device)
    if tok.eos_token_id is None:
        raise ModelError(f"{folder}: the tokenizer has no eos token; vicuna_v1 answers end with one")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    max_len = min(int(getattr(model.config, "max_position_embeddings", 2048) or 2048), 4096)

    def collate_text(examples: list[Example]) -> TextBatch:
        rows = []
        for ex in examples:  # the conversation with its <image> placeholder dropped (0 image tokens)
            enc = encode_conversation(tok, ex.record.conversations, 0)
            rows.append((enc.input_ids[:max_len], enc.assistant_mask[:max_len]))
        t = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), t), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), t), dtype=torch.long)
        labels = torch.full((len(rows), t), IGNORE, dtype=torch.long)
        for i, (row, answer) in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
            supervised = torch.ones(len(row), dtype=torch.bool) if every_position else torch.tensor(answer)
            labels[i, : len(row)] = torch.where(supervised, torch.tensor(row), IGNORE)
        return TextBatch(ids, mask, labels)

    def forward(batch: TextBatch) -> torch.Tensor:
        batch = batch.to(device)
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    @torch.inference_mode()
    def signals(batch: TextBatch, k: int) -> TeacherOutput:
        return topk_signals(forward(batch), batch.labels.to(device), k)

    vocab = model.get_output_embeddings().weight.shape[0]  # may exceed len(tok) (padded vocabularies)
    return Teacher("causal_lm", model, vocab, collate_text, forward, signals)


# -------------------------------------------------------------------------------------------- data


def synthetic_shards(root: Path, records: int) -> Path:
    """A synthetic training split of about ``records`` records (~7.4 per image), sharded under ``root``."""
    images = max(2, math.ceil(records / 7) + 1)
    cfg = DataConfig(
        synthetic=SyntheticConfig(train_images=images, val_images=1, test_images=1, pretrain_texts=1)
    )
    prepare(cfg, root / "prepared")
    write_shards(
        root / "prepared" / "train.jsonl", root / "prepared", root / "shards", maxcount=10**6, maxsize=10**12
    )
    return root / "shards"


def keyed_batches(teacher: Teacher, shard_dir: Path, batch_size: int, n: int) -> Iterator[KeyedBatch]:
    """The first ``n`` batches of the shards, read and collated as the builder does (shard by shard)."""
    names = [s["name"] for s in load_manifest(shard_dir)["shards"]]
    per_shard = (shard_batches(shard_dir / name, batch_size, teacher.collate) for name in names)
    return itertools.islice(itertools.chain.from_iterable(per_shard), n)


def disk_bytes(array_dir: Path) -> int:
    """Bytes of an array's chunk files (its zarr.json excluded: constant per shard, not per token)."""
    return sum(p.stat().st_size for p in (array_dir / "c").rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------ (b) throughput


def _timed(fn: Callable[[], Any], times: list[float]) -> None:
    """Run ``fn`` once and append its wall time to ``times``."""
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)


def throughput(
    teacher: Teacher,
    batches: Callable[[], Iterator[KeyedBatch]],
    k: int,
    encoding: str,
    workdir: Path,
    repeats: int,
) -> dict[str, float]:
    """Median seconds of: bare forward, full build with and without overlap, and a sequential profile."""
    pre = list(batches())  # pre-collated copies for the bare forward and the profile
    fp = scratch_fingerprint(teacher.vocab_size, k, encoding)

    def signals(batch: Any) -> TeacherOutput:
        return teacher.signals(batch, k)

    def bare() -> None:
        with torch.inference_mode():
            for kb in pre:
                teacher.forward(kb.batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the build loops wait for their results (.cpu()); so must this one

    def build(
        overlap: bool,
        source: Callable[[], Iterator[KeyedBatch]] = batches,
        fn: Callable[[Any], TeacherOutput] = signals,
    ) -> None:
        path = workdir / "throughput.zarr"
        shutil.rmtree(path, ignore_errors=True)
        with store.CacheWriter(path, fp).shard("bench") as sw:
            build_shard(fn, source(), sw, overlap=overlap)

    def forward_topk() -> dict[int, TeacherOutput]:
        with torch.inference_mode():
            return {id(kb.batch): signals(kb.batch) for kb in pre}

    def write_only(outs: dict[int, TeacherOutput]) -> None:
        build(False, lambda: iter(pre), lambda batch: outs[id(batch)])

    # Warm-up: one batch each way (allocator, oneDNN kernels, first-use imports).
    bare_first = pre[:1]
    with torch.inference_mode():
        teacher.forward(bare_first[0].batch)
    build(True, lambda: iter(bare_first))
    times: dict[str, list[float]] = {n: [] for n in ("bare", "build", "build_sequential")}
    times |= {n: [] for n in ("read_collate", "forward_topk", "write")}
    outs: dict[int, TeacherOutput] = {}
    for _ in range(repeats):  # interleaved, so that load from other processes hits every variant alike
        _timed(bare, times["bare"])
        _timed(functools.partial(build, True), times["build"])
        _timed(functools.partial(build, False), times["build_sequential"])
        _timed(lambda: list(batches()), times["read_collate"])
        t0 = time.perf_counter()
        outs = forward_topk()
        times["forward_topk"].append(time.perf_counter() - t0)
        _timed(functools.partial(write_only, outs), times["write"])
    med = {n: statistics.median(v) for n, v in times.items()}
    for key in ("build", "build_sequential"):  # paired within a round: robust to drifting machine load
        med[f"ratio_{key}"] = statistics.median(b / t for b, t in zip(times["bare"], times[key], strict=True))
    med["tokens"] = sum(len(out.target_logprob) for out in outs.values())
    return med


# ---------------------------------------------------------------------------- (a) bytes, (c) KL


@dataclass
class Collected:
    """What one analysis pass over the batches keeps: the builder's rows at max k, raw features, KLs."""

    outputs: list[tuple[KeyedBatch, TeacherOutput]]
    kl: dict[tuple[int, str], list[float]]  # (k, "exact" | encoding) -> per-token KL(p || p_k)
    tail: dict[int, list[float]]  # k -> per-token tail mass
    student: dict[int, list[float]]  # k -> per-token (k+1)-bucket RKL of the stand-in student
    student_exact: list[float]  # per-token exact KL(q || p) over the vocabulary


def _plogq(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Elementwise p log q with p = exp(lp), and 0 where p = 0 (never 0 * inf = NaN)."""
    return torch.where(lp > -math.inf, lp.exp() * lq, 0.0)


def _recon_kl(lp: torch.Tensor, top: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    """(N,) KL(p || p_k) for p_k = exp(decoded) on the top-k and the rest of the mass spread uniformly.

    lp (N, V) float64 full teacher log-probs; top (N, k) their exact top-k; decoded (N, k) what the
    cache returns for them (``top`` itself for the exact reconstruction).
    """
    n_rest = lp.shape[1] - top.shape[1]
    head = (_plogq(top, top) - _plogq(top, decoded)).sum(1)  # (N,) the top-k part
    if n_rest == 0:
        return head
    tail = (1.0 - top.exp().sum(1)).clamp(min=0.0)  # (N,) exact tail mass
    tail_hat = (1.0 - decoded.exp().sum(1)).clamp(min=1e-300)  # (N,) the cache's
    rest = _plogq(lp, lp).sum(1) - _plogq(top, top).sum(1)  # (N,) sum over the tail of p log p
    return head + rest - tail * torch.log(tail_hat / n_rest)


def _add_kls(col: Collected, z: torch.Tensor, ks: Sequence[int], encodings: Sequence[str]) -> None:
    """Accumulate (c) for teacher logits z (N, V) at N supervised positions."""
    z = z.double()
    lp = torch.log_softmax(z, dim=-1)  # (N, V) teacher
    lq = torch.log_softmax(z / STUDENT_TEMPERATURE, dim=-1)  # (N, V) stand-in student
    col.student_exact += (_plogq(lq, lq) - _plogq(lq, lp)).sum(1).tolist()
    top, ids = lp.topk(max(ks), dim=-1)  # (N, kmax)
    for k in ks:
        col.kl[(k, "exact")] += _recon_kl(lp, top[:, :k], top[:, :k]).tolist()
        col.tail[k] += (1.0 - top[:, :k].exp().sum(1)).clamp(min=0).tolist()
        for enc in encodings:
            arrays = codec.encode_values(top[:, :k].float().numpy(), enc)
            decoded = torch.from_numpy(codec.decode_values(arrays, enc)).double()
            col.kl[(k, enc)] += _recon_kl(lp, top[:, :k], decoded).tolist()
        # What the reverse-KL loss computes from a cache with the exact top-k values.
        col.student[k] += reverse_kl(z / STUDENT_TEMPERATURE, ids[:, :k], top[:, :k]).tolist()


def collect(
    teacher: Teacher,
    batches: Iterator[KeyedBatch],
    ks: Sequence[int],
    encodings: Sequence[str],
    rows_per_step: int = 512,
) -> Collected:
    """One pass: the builder's output at max(ks) per batch (for (a)) and the KLs of (c)."""
    kl: dict[tuple[int, str], list[float]] = {(k, n): [] for k in ks for n in ("exact", *encodings)}
    col = Collected([], kl, {k: [] for k in ks}, {k: [] for k in ks}, [])
    with torch.inference_mode():
        for kb in batches:
            col.outputs.append((kb, teacher.signals(kb.batch, max(ks))))
            logits = teacher.forward(kb.batch)  # (B, T, V) again: the signals keep only the top-k
            sel = kb.batch.labels[:, 1:].to(logits.device) != IGNORE  # (B, T-1)
            z = logits[:, :-1][sel].cpu()  # (N, V)
            for start in range(0, len(z), rows_per_step):  # float64 (rows, V) blocks: bounded memory
                _add_kls(col, z[start : start + rows_per_step], ks, encodings)
    return col


def sliced(out: TeacherOutput, k: int, pooling: int | None) -> TeacherOutput:
    """The builder's output at a smaller k (top-k is a prefix of top-kmax), features pooled or dropped."""
    feats = None
    if pooling is not None and out.features is not None:
        feats = pool_image_features(torch.from_numpy(out.features), pooling).numpy()
    return replace(
        out,
        topk_ids=out.topk_ids[:, :k],
        topk_logprobs=np.ascontiguousarray(out.topk_logprobs[:, :k]),
        features=feats,
    )


def write_sizes(
    col: Collected, vocab: int, k: int, encoding: str, pooling: int | None, workdir: Path
) -> dict[str, int]:
    """Write the collected rows through the store as the builder does; bytes of each array on disk."""
    path = workdir / f"sizes-{k}-{encoding}-{pooling}.zarr"
    shutil.rmtree(path, ignore_errors=True)
    by_id = {id(kb.batch): sliced(out, k, pooling) for kb, out in col.outputs}
    with store.CacheWriter(path, scratch_fingerprint(vocab, k, encoding, pooling or 1)).shard("bench") as sw:
        build_shard(lambda b: by_id[id(b)], (kb for kb, _ in col.outputs), sw, overlap=False)
    group = path / "bench"
    sizes = {p.name: disk_bytes(p) for p in group.iterdir() if p.is_dir()}
    shutil.rmtree(path)
    return sizes


# -------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; k, batch size, encoding and pooling default to the pipeline's (cache.*)."""
    cfg = CacheConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="local HF causal LM or LLaVA checkpoint")
    ap.add_argument("--shards", type=Path, help="a shard folder with manifest.json (default: synthetic)")
    ap.add_argument("--k", type=int, nargs="+", default=sorted({4, 8, cfg.k, 32, 64}))
    ap.add_argument("--batch-size", type=int, default=cfg.batch_size)
    others = [e for e in codec.ENCODINGS if e != cfg.encoding]
    ap.add_argument("--encoding", nargs="+", default=[cfg.encoding, *others], help="the first one is timed")
    ap.add_argument("--pooling", type=int, nargs="+", default=sorted({cfg.pooling, 2}), help="for (a)")
    ap.add_argument("--batches", type=int, default=6, help="batches used (the first ones)")
    ap.add_argument("--repeats", type=int, default=3, help="timing rounds for (b); medians are printed")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--throughput-k", type=int, default=cfg.k, help="k of the build timed in (b)")
    ap.add_argument(
        "--prefix-reuse",
        action=argparse.BooleanOptionalAction,
        default=cfg.prefix_reuse,
        help="a LLaVA build shares each image's prefix (cache.prefix_reuse); the bare forward never does",
    )
    ap.add_argument(
        "--every-position",
        action="store_true",
        help="a causal LM is supervised at every token (the top-k extraction's worst case), not the answers",
    )
    args = ap.parse_args(argv)
    for enc in args.encoding:
        codec.check_encoding(enc)
    return args


def print_sizes(
    col: Collected, teacher: Teacher, ks: list[int], args: argparse.Namespace, work: Path
) -> None:
    """(a): bytes per cached token for each k and encoding, and bytes per image for each pooling."""
    n_tok = sum(len(out.target_logprob) for _, out in col.outputs)
    print("(a) bytes per cached token on disk (Blosc zstd-3 + shuffle, chunk files of the store)\n")
    rows = []
    for k in ks:
        for enc in args.encoding:
            sizes = write_sizes(col, teacher.vocab_size, k, enc, None, work)
            ids = sizes["topk_ids"]
            values = sum(sizes[name] for name in codec.value_arrays(enc, k))
            target = sizes["target_logprob"]
            per_token = [f"{b / n_tok:.2f}" for b in (ids, values, ids + values, ids + values + target)]
            rows.append([k, enc, *per_token, (2 + 2) * k + 4])
    print(table(["k", "encoding", "ids", "values", "ids+values", "+ target", "raw u16+f16+f32"], rows) + "\n")
    if teacher.kind != "llava":
        return
    n_img = sum(len(set(kb.image_keys)) for kb, _ in col.outputs)
    p_full, d = col.outputs[0][1].features.shape[1:]
    rows = []
    for pool in args.pooling:
        feats = write_sizes(col, teacher.vocab_size, ks[0], args.encoding[0], pool, work)["features"]
        p = p_full // pool**2
        rows.append([pool, f"{p} x {d}", f"{feats / n_img:,.0f}", f"{p * d * 2:,}"])
    print(f"bytes per image on disk (float16 projector features, {n_img} images)\n")
    print(table(["pooling", "P' x D", "bytes/image", "raw"], rows) + "\n")


def print_throughput(
    teacher: Teacher, batches: Callable[[], Iterator[KeyedBatch]], args: argparse.Namespace, work: Path
) -> None:
    """(b): bare teacher forward against the builder's loop, sequential and overlapped."""
    print(
        f"(b) throughput at k = {args.throughput_k}, encoding {args.encoding[0]} "
        f"(medians of {args.repeats} rounds after warm-up; 1 torch thread)\n"
    )
    t = throughput(teacher, batches, args.throughput_k, args.encoding[0], work, args.repeats)
    loops = [
        ("bare teacher forward (pre-collated)", "bare"),
        ("build, sequential (build_cache on CPU)", "build_sequential"),
        ("build, overlapped (build_cache on GPU)", "build"),
    ]
    rows = [
        [name, f"{t[key]:.3f}", f"{t['tokens'] / t[key]:,.0f}", f"{t.get(f'ratio_{key}', 1.0):.3f}"]
        for name, key in loops
    ]
    print(table(["loop", "seconds", "supervised tok/s", "ratio to bare (paired)"], rows) + "\n")
    device = torch.device(args.device).type
    used = "build" if device == "cuda" else "build_sequential"
    print(
        f"throughput ratio of build_cache on {device}: {t[f'ratio_{used}']:.3f} (target >= 0.9)\n"
        "sequential profile (s): "
        + ", ".join(f"{n} {t[n]:.3f}" for n in ("read_collate", "forward_topk", "write"))
        + f" (forward_topk - bare forward = top-k extraction: {t['forward_topk'] - t['bare']:+.3f})\n"
    )


def print_kl(col: Collected, ks: list[int], encodings: Sequence[str]) -> None:
    """(c): the top-k reconstruction error and the bucket KL against the exact one."""
    print("(c) top-k approximation error (means over supervised tokens, nats)\n")
    rows = []
    exact_student = float(np.mean(col.student_exact))
    for k in ks:
        exact = float(np.mean(col.kl[(k, "exact")]))
        row = [k, f"{np.mean(col.tail[k]):.4f}", f"{exact:.4g}"]
        row += [f"{np.mean(col.kl[(k, enc)]) - exact:+.1e}" for enc in encodings]
        bucket = float(np.mean(col.student[k]))
        row += [f"{bucket:.4f}", f"{exact_student:.4f}", f"{bucket / exact_student:.3f}"]
        rows.append(row)
    columns = ["k", "tail mass", "KL(p || p_k)"] + [f"+ {enc} rounding" for enc in encodings]
    columns += [
        f"(k+1)-bucket KL(q || p), T = {STUDENT_TEMPERATURE:g}",
        "exact KL(q || p)",
        "bucket / exact",
    ]
    print(table(columns, rows) + "\n")
    print(
        "p_k: the top-k kept, the tail mass spread uniformly over the other V - k tokens.\n"
        "The losses see the (k+1)-bucket KL, a lower bound of the exact KL over the vocabulary\n"
        "(merging tokens into one tail bucket cannot increase a divergence: data-processing\n"
        "inequality); it is exact at k = V."
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    device = torch.device(args.device)
    reuse, every = args.prefix_reuse, args.every_position
    teacher = load_teacher(args.model, device, prefix_reuse=reuse, every_position=every)
    ks = sorted(k for k in args.k if k <= teacher.vocab_size)
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        work = Path(tmp)
        shard_dir = args.shards or synthetic_shards(work / "data", args.batches * args.batch_size)

        def batches() -> Iterator[KeyedBatch]:
            return keyed_batches(teacher, shard_dir, args.batch_size, args.batches)

        col = collect(teacher, batches(), ks, args.encoding)
        n_tok = sum(len(out.target_logprob) for _, out in col.outputs)
        n_rec = sum(len(out.counts) for _, out in col.outputs)
        print(
            f"teacher {args.model} ({teacher.kind}, V = {teacher.vocab_size}); {n_rec} records, "
            f"{n_tok} supervised tokens in {len(col.outputs)} batches of <= {args.batch_size}; "
            f"shards {'(synthetic)' if args.shards is None else args.shards}\n"
        )
        print_sizes(col, teacher, ks, args, work)
        print_throughput(teacher, batches, args, work)
        print_kl(col, ks, args.encoding)


if __name__ == "__main__":
    main()
