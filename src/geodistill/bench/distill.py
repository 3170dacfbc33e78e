"""Per-step cost of distillation: SFT vs distillation from the teacher cache vs a live teacher in the step.

    python -m geodistill.bench.distill [--batch-sizes 8 16 32] [--steps 8] [--clock wall|cpu]
                                       [--teacher DIR --student DIR]

Four step functions, each timed inside the shared loop (``run_loop``: data, collate, forward, backward,
clip, AdamW) on the same batches from the same initial student:

- ``sft``: cross-entropy on ground truth (the baseline / control);
- ``kd-cache``: the distillation step of ``run_distill`` -- reverse KL on the cached teacher top-k,
  L_align on cached projector features, L_PT on a pretraining batch (``distill.*`` weights, k, pooling);
- ``kd-cache-nopt``: the same without L_PT, which is a forward/backward of its own on ``pt_batch_size``
  texts: it separates the cost of distilling from the cost of the extra pretraining batch;
- ``kd-live``: kd-cache with the teacher targets computed by a teacher forward inside every step
  (``teacher_signals``, the function that builds the cache), as online-KD trainers do;
- ``kd-full``: the default ``distill`` step itself (``DistillStep``): kd-cache every step plus MiniLLM's
  on-policy terms every ``distill.onpolicy.every`` steps (teacher-mixed sampling by the student with the
  live teacher, both scoring the samples). Its figure is the **mean** over the timed steps, whose number is
  rounded up to a multiple of ``every``: the on-policy cost amortised over its interval.

Reported: seconds per step (kd-full: mean, see above; the others: median over steps after ``--warmup``;
each step the best of ``--repeats`` rounds over the variants, since contention from other processes only
ever adds time), the ratio to SFT, and the teacher's forward alone (what the cache saves). ``--clock cpu``
times this process's CPU time instead of wall time: with one thread it is the uncontended wall time, robust
on a shared machine.

Settings: the pipeline's defaults (the dataclass defaults, equal to the shipped params.yaml), or those of
``--params FILE``. Models: the embedded default architectures (``teacher.arch``, ``student.arch``;
random weights: speed does not depend on them), or checkpoints. Data: a synthetic split built in a temporary
folder (not timed), with its teacher cache. One torch thread by default (docs/design.md: 2 threads collapse
under CPU contention).
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from geodistill.cache.build import build_cache, teacher_signals
from geodistill.cache.fingerprint import cache_fingerprint
from geodistill.cache.store import CacheReader
from geodistill.config import SECTIONS, CacheConfig, DataConfig, DistillConfig, load_section
from geodistill.data.collate import IGNORE, Batch, Example, shuffled_batches
from geodistill.data.prepare import image_root, prepare, read_pretrain, tokenizer_corpus
from geodistill.data.shards import load_manifest, write_shards
from geodistill.distill.kd import (
    CachedTargets,
    DistillStep,
    KDModule,
    gather_targets,
    offline_terms,
    pretrain_batch,
)
from geodistill.distill.losses import make_adapter
from geodistill.distill.sft import Collator, sft_step
from geodistill.distill.train import run_loop
from geodistill.models.checkpoints import load_for_training, save_llava, write_fingerprint
from geodistill.models.llava import build_llava, count_parameters, num_image_tokens
from geodistill.models.tokenizer import build_tokenizer, check_compatible
from geodistill.models.transform import ImageTransform

VARIANTS = ("sft", "kd-cache", "kd-cache-nopt", "kd-live", "kd-full")
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass
class Setup:
    """Everything the timed steps need, built once (untimed)."""

    tok: Any
    transform: ImageTransform
    teacher: nn.Module
    student: nn.Module  # initial weights; every run trains a deep copy
    reader: CacheReader
    shards: Path  # the train shard folder
    pt_texts: list[str]
    distill: DistillConfig
    cache: CacheConfig


def section(name: str, params: str | None) -> Any:
    """A params section: from the file ``params``, or the dataclass default (the shipped params.yaml)."""
    return SECTIONS[name]() if params is None else load_section(name, params)


def build_setup(root: Path, args: argparse.Namespace) -> Setup:
    """Synthetic data, tokenizer, models and the teacher cache under ``root`` (the pipeline's settings)."""
    synth = section("data", args.params).synthetic
    data = DataConfig(
        synthetic=replace(synth, train_images=args.images, val_images=1, test_images=1, pretrain_texts=500)
    )
    prepared, shards = root / "prepared", root / "shards"
    prepare(data, prepared)
    write_shards(prepared / "train.jsonl", image_root(prepared), shards, maxcount=512, maxsize=10**9)
    cache_cfg: CacheConfig = section("cache", args.params)
    distill: DistillConfig = section("distill", args.params)
    if args.teacher:
        teacher_dir = Path(args.teacher)
        teacher, tok, transform = load_for_training(teacher_dir)
        student, student_tok, _ = load_for_training(args.student)
        check_compatible(tok, student_tok)
    else:
        tok = build_tokenizer(tokenizer_corpus(prepared), section("tokenizer", args.params).vocab_size)
        t_arch, s_arch = section("teacher", args.params).arch, section("student", args.params).arch
        transform = ImageTransform(t_arch.image_size)
        teacher, student = build_llava(t_arch, tok, seed=0), build_llava(s_arch, tok, seed=1)
        teacher_dir = root / "teacher"
        save_llava(teacher, tok, transform, teacher_dir)
        write_fingerprint(teacher_dir)
    teacher.eval().requires_grad_(False)
    cache_path = root / "cache.zarr"
    build_cache(teacher_dir, shards, cache_path, cache_cfg, progress=False)
    manifest = load_manifest(shards)
    fp = cache_fingerprint(teacher_dir, manifest, cache_cfg, len(tok))
    reader = CacheReader(cache_path, fp, manifest, max_shards=None)
    reader.preload()  # run_distill's reader keeps every shard once touched; load them before timing
    return Setup(
        tok, transform, teacher, student, reader, shards, read_pretrain(prepared), distill, cache_cfg
    )


def live_targets(teacher: nn.Module, batch: Batch, k: int, pooling: int) -> CachedTargets:
    """The cache's targets for ``batch``, computed by a teacher forward now instead of read from disk."""
    sig = teacher_signals(teacher, batch, k, pooling)
    return CachedTargets(
        torch.from_numpy(sig.topk_ids).long(),  # (M, k)
        torch.from_numpy(sig.topk_logprobs).float(),  # (M, k)
        batch.labels[:, 1:] != IGNORE,  # (B, T-1)
        torch.from_numpy(sig.features),  # (B, P', D_t)
    )


def step_function(variant: str, s: Setup, module: KDModule, collator: Collator, pt_batch: int) -> Callable:
    """The loss of one step, as ``run_loop`` calls it; the KD ones compose run_distill's parts."""
    cfg, train = s.distill, s.distill.train
    rng_seed = f"bench-{train.seed}"

    def sft(examples: list[Example], _step: int) -> dict[str, torch.Tensor]:
        return sft_step(module.student, collator(examples))

    if variant == "kd-full":
        full = replace(cfg, onpolicy=replace(cfg.onpolicy, enabled=True), pt_batch_size=max(pt_batch, 1))
        texts = s.pt_texts if pt_batch else []
        generator = torch.Generator().manual_seed(0)
        return DistillStep(module, s.reader, collator, full, s.cache.pooling, texts, s.teacher, generator, 0)

    def kd(examples: list[Example], step: int) -> dict[str, torch.Tensor]:
        batch = collator(examples)
        if variant.startswith("kd-cache"):
            targets = gather_targets(s.reader, examples, batch)
        else:
            targets = live_targets(s.teacher, batch, s.cache.k, s.cache.pooling)
        pt = None
        if pt_batch and variant != "kd-cache-nopt":
            pt = pretrain_batch(
                s.pt_texts, random.Random(f"{rng_seed}-{step}"), pt_batch, s.tok, train.max_len
            )
        return offline_terms(module, batch, targets, cfg, s.cache.pooling, pt)

    return sft if variant == "sft" else kd


def time_variant(
    variant: str, s: Setup, batch_size: int, steps: int, pt_batch: int, clock: Callable[[], float]
) -> list[float]:
    """Seconds per step (every step, warm-up included), from the loop's per-step log callback."""
    student = copy.deepcopy(s.student)
    width = student.config.text_config.hidden_size
    d_teacher = int(s.reader.features([next(iter(s.reader.image_index()))]).shape[-1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = KDModule(student, make_adapter(width, d_teacher) if variant != "sft" else None)
    train = replace(s.distill.train, steps=steps, batch_size=batch_size, log_every=1, checkpoint_every=0)
    collator = Collator(s.tok, s.transform, num_image_tokens(student), train.max_len)
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = clock()
        run_loop(
            module,
            shuffled_batches(s.shards, batch_size, train.seed),
            step_function(variant, s, module, collator, pt_batch),
            train,
            Path(tmp),
            logger=lambda _step, _values: stamps.append(clock()),
            resume=False,
        )
    return np.diff([t0, *stamps]).tolist()


def time_teacher_forward(
    s: Setup, batch_size: int, steps: int, repeats: int, clock: Callable[[], float]
) -> float:
    """The live variant's extra work alone, teacher forward + top-k: median over batches of the best of
    ``repeats`` runs each."""
    collator = Collator(s.tok, s.transform, num_image_tokens(s.student), s.distill.train.max_len)
    batches = shuffled_batches(s.shards, batch_size, seed=0)
    times = []
    for _ in range(steps):
        batch = collator(next(batches))
        runs = []
        for _ in range(repeats):
            t0 = clock()
            teacher_signals(s.teacher, batch, s.cache.k, s.cache.pooling)
            runs.append(clock() - t0)
        times.append(min(runs))
    return statistics.median(times)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--teacher", default="", help="teacher checkpoint folder (default: teacher.arch)")
    ap.add_argument("--student", default="", help="student checkpoint folder (with --teacher)")
    ap.add_argument("--images", type=int, default=64, help="synthetic training images (~7 records each)")
    ap.add_argument("--pt-batch-size", type=int, default=None, help="L_PT texts per step (default: params)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over the variants (best time per step)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=list(CLOCKS), default="wall", help="cpu: process time (see above)")
    ap.add_argument("--params", help="a params.yaml to read (default: the shipped defaults)")
    args = ap.parse_args(argv)
    every = section("distill", args.params).onpolicy.every
    args.steps = -(-args.steps // every) * every  # whole on-policy intervals (kd-full's mean)
    if bool(args.teacher) != bool(args.student):
        ap.error("--teacher and --student go together")
    return args


def time_batch_size(
    s: Setup, batch_size: int, args: argparse.Namespace, pt_batch: int, clock: Callable[[], float]
) -> dict[str, float]:
    """Median s/step of every variant at one batch size, and the teacher forward alone (``teacher``)."""
    # Rounds over the variants; every variant sees the same batch at step i, so each step keeps its
    # best time over the rounds (CPU contention from other processes only adds time).
    best: dict[str, np.ndarray] = {v: np.full(args.warmup + args.steps, np.inf) for v in VARIANTS}
    for _ in range(args.repeats):
        for v in VARIANTS:
            times = time_variant(v, s, batch_size, args.warmup + args.steps, pt_batch, clock)
            best[v] = np.minimum(best[v], times)
    med = {v: float(np.median(best[v][args.warmup :])) for v in VARIANTS}
    med["kd-full"] = float(np.mean(best["kd-full"][args.warmup :]))  # on-policy steps amortised
    med["teacher"] = time_teacher_forward(s, batch_size, args.steps, args.repeats, clock)
    return med


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    with tempfile.TemporaryDirectory() as tmp:
        s = build_setup(Path(tmp), args)
        pt_batch = s.distill.pt_batch_size if args.pt_batch_size is None else args.pt_batch_size
        if s.distill.pt_weight <= 0:
            pt_batch = 0
        n_t, n_s = count_parameters(s.teacher)["total"], count_parameters(s.student)["total"]
        print(
            f"teacher {n_t / 1e6:.2f}M params, student {n_s / 1e6:.2f}M; vocab {len(s.tok)}; "
            f"cache k={s.cache.k} ({s.cache.encoding}), pooling {s.cache.pooling}; L_PT batch {pt_batch}; "
            f"{args.threads} thread(s)\ns/step ({args.clock} clock): median over {args.steps} steps "
            f"(after {args.warmup}) of each step's best of {args.repeats} rounds"
        )
        header = f"{'batch':>5}  {'sft s/step':>10}" + "".join(f"  {v:>16}" for v in VARIANTS[1:])
        print(header + f"  {'teacher fwd':>11}  {'live - cache':>12}\n" + "-" * (len(header) + 27))
        for b in args.batch_sizes:
            med = time_batch_size(s, b, args, pt_batch, clock)
            cell = [f"{med[v]:.4f} ({med[v] / med['sft']:.2f}x)" for v in VARIANTS[1:]]
            live_minus_cache = med["kd-live"] - med["kd-cache"]
            print(
                f"{b:>5}  {med['sft']:>10.4f}"
                + "".join(f"  {c:>16}" for c in cell)
                + f"  {med['teacher']:>11.4f}  {live_minus_cache:>12.4f}"
            )


if __name__ == "__main__":
    main()
