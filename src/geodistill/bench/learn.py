"""Can a fresh model learn to read a task's answers off the image, and how fast? Minutes per question.

    python -m geodistill.bench.learn [--model teacher] [--tasks referring] [--steps 400] [--every 100]
        [--positions clip|sincos] [--lr LR] [--batch-size B] [--records 96] [--shards data/shards]
        [--tokenizer models/tokenizer] [--params params.yaml] [--out reports/learn.json]

`bench.grounding` asks whether *trained* models use the image; this asks whether the architecture can
learn to at all, before a whole `bench.edge` run is spent on it. It builds the model of ``teacher.arch``
or ``student.arch`` (``params.yaml``; init seed 0, ``--positions`` overriding ``arch.vision_positions``)
and trains it by SFT with that section's train settings (batch size, lr, warmup, max_len; ``--steps``,
``--lr`` and ``--batch-size`` override) on **only** the records of ``--tasks`` in ``shards/train``, through
the pipeline's training loop. Every ``--every`` steps it scores the first ``--records`` validation
records of each task as `bench.grounding` (b) does: answer-token accuracy with each record's own image and
with another record's. The gap (true - rolled) is what the model reads off the image; a gap near 0
while the loss falls means the answers are learnt from priors only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from geodistill.bench.grounding import RELIANCE_TASKS, first_records, reliance
from geodistill.config import LlavaArch, TrainConfig, load_section
from geodistill.data.collate import Example, shuffled_batches
from geodistill.distill.sft import Collator, sft_step
from geodistill.distill.train import run_loop
from geodistill.markdown import table
from geodistill.models.llava import build_llava, num_image_tokens
from geodistill.models.tokenizer import load_tokenizer
from geodistill.models.transform import ImageTransform


def task_batches(shard_dir: Path, tasks: set[str], batch_size: int, seed: int) -> Iterator[list[Example]]:
    """Endless, deterministic batches of the records of ``tasks`` only (the pipeline's shuffle, filtered)."""
    buf: list[Example] = []
    for batch in shuffled_batches(shard_dir, batch_size, seed):
        buf += [ex for ex in batch if ex.record.task in tasks]
        while len(buf) >= batch_size:
            yield buf[:batch_size]
            buf = buf[batch_size:]


def require_records(shard_dir: Path, tasks: Sequence[str], n: int) -> dict[str, list[Example]]:
    """:func:`first_records`, with a task that has none an error."""
    out = first_records(shard_dir, tasks, n)
    if missing := [t for t, exs in out.items() if not exs]:
        raise SystemExit(
            f"{shard_dir}: no records of task(s) {', '.join(missing)}; check --tasks and --shards"
        )
    return out


def fresh_model(model: str, params: Path, positions: str | None) -> tuple[LlavaArch, TrainConfig]:
    """The arch of ``model`` (teacher or student, ``positions`` overriding ``vision_positions``) and the
    train settings it is trained with from scratch (``teacher.train``; the student's ``sft.train``)."""
    section = load_section(model, params)
    arch = section.arch
    if positions is not None:
        arch = dataclasses.replace(arch, vision_positions=positions)
    return arch, section.train if model == "teacher" else load_section("sft", params).train


def learn(
    arch: LlavaArch, train: TrainConfig, tok: Any, shards: Path, tasks: Sequence[str], n_records: int
) -> list[dict[str, Any]]:
    """Train as the module docstring says; one row per (checkpoint step, task)."""
    model = build_llava(arch, tok, seed=0)
    transform = ImageTransform(arch.image_size)
    collator = Collator(tok, transform, num_image_tokens(model), train.max_len)
    val = require_records(shards / "val", tasks, n_records)
    require_records(shards / "train", tasks, 1)  # fail before training, not in an endless filter
    rows: list[dict[str, Any]] = []

    def score(step: int, row: dict[str, float]) -> None:
        """run_loop's logger: called every ``train.log_every`` steps (``--every``) and at the last."""
        model.eval()
        for task, exs in val.items():
            r = reliance(model, tok, transform, exs, RELIANCE_TASKS.get(task, "all"), train.batch_size)
            rows.append({"step": step, "task": task, "train_loss": row["loss"], **r})
            true, rolled = 100 * r["true_image"], 100 * r["rolled_image"]
            print(f"step {step} {task}: true image {true:.1f} %, rolled {rolled:.1f} %", flush=True)
        model.train()

    torch.manual_seed(train.seed)
    with tempfile.TemporaryDirectory() as tmp:
        run_loop(
            model,
            task_batches(shards / "train", set(tasks), train.batch_size, train.seed),
            lambda examples, _step: sft_step(model, collator(examples)),
            train,
            Path(tmp),
            logger=score,
            resume=False,
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("teacher", "student"), default="teacher")
    ap.add_argument("--tasks", default="referring", help="comma-separated record tasks to train on and score")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--every", type=int, default=100, help="score image reliance every this many steps")
    ap.add_argument("--positions", choices=("clip", "sincos"), default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--records", type=int, default=96, help="validation records per task")
    ap.add_argument("--shards", type=Path, default=Path("data/shards"))
    ap.add_argument("--tokenizer", type=Path, default=Path("models/tokenizer"))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--out", type=Path, default=Path("reports/learn.json"))
    args = ap.parse_args(argv)
    arch, train_cfg = fresh_model(args.model, args.params, args.positions)
    over = {"steps": args.steps, "checkpoint_every": 0, "log_every": args.every}
    over |= {k: v for k, v in (("lr", args.lr), ("batch_size", args.batch_size)) if v is not None}
    train_cfg = dataclasses.replace(train_cfg, **over)
    tasks = [t for t in args.tasks.split(",") if t]
    rows = learn(arch, train_cfg, load_tokenizer(args.tokenizer), args.shards, tasks, args.records)
    settings = {"model": args.model, "tasks": tasks, "arch": dataclasses.asdict(arch),
                "train": dataclasses.asdict(train_cfg)}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    body = [
        [
            str(r["step"]),
            r["task"],
            f"{r['train_loss']:.3f}",
            f"{100 * r['true_image']:.1f}",
            f"{100 * r['rolled_image']:.1f}",
            f"{100 * (r['true_image'] - r['rolled_image']):+.1f}",
            str(r["tokens"]),
        ]
        for r in rows
    ]
    print(table(["step", "task", "train loss", "true image %", "rolled image %", "gap", "tokens"], body))


if __name__ == "__main__":
    main()
